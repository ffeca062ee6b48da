"""Fixtures of the data-pipeline tests: synthetic image–caption pairs and a scripted OpenAI-compatible LLM."""


import hashlib
import json
import threading
import time
from pathlib import Path

import pytest

GROUPS = ("dark", "rings", "stripes")
FINDINGS = ("pneumothorax", "cardiomegaly", "pleural effusion", "renal cyst", "fracture", "hydronephrosis",
            "atelectasis", "consolidation")


def _image(group: str, i: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:64, 0:64]
    if group == "dark":
        arr = rng.integers(0, 40, (64, 64))
    elif group == "rings":
        arr = 127 + 120 * np.sin(np.hypot(yy - 32, xx - 32) / (2 + i % 3))
    else:
        arr = 127 + 120 * np.sin(xx / (2 + i % 3))
    arr = np.clip(arr + rng.normal(0, 5, (64, 64)), 0, 255).astype("uint8")
    return Image.fromarray(arr, "L").convert("RGB")


def make_pairs(root: Path, n: int = 24, tags: dict[int, str] | None = None) -> tuple[Path, Path]:
    """``n`` pairs in three image groups (dark noise, rings, stripes), captions naming a finding; ``tags`` puts a
    marker word the scripted LLM reacts to (MALFORMED, LEAK, RATE, SLOW, DOWN) into chosen captions."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        group = GROUPS[i % 3]
        _image(group, i).save(images / f"img{i:03d}.png")
        tag = (tags or {}).get(i, "")
        caption = f"{group} scan {i} showing {FINDINGS[i % len(FINDINGS)]} {tag}".strip()
        lines.append(json.dumps({"id": f"p{i:03d}", "image": f"img{i:03d}.png", "caption": caption,
                                 "license": "CC BY 4.0" if i % 2 else "CC0", "source": "synthetic"}))
    pairs = root / "pairs.jsonl"
    pairs.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return pairs, images


def good_reply(caption: str) -> dict:
    finding = next((f for f in FINDINGS if f in caption), "normal study")
    others = [f for f in FINDINGS if f != finding][:3]
    k = int(hashlib.sha256(caption.encode()).hexdigest(), 16) % 4
    opts = others[:k] + [finding] + others[k:]
    return {"question": "Which finding does this image show?", "options": dict(zip("ABCD", opts)),
            "answer": "ABCD"[k], "explanation": f"The image shows {finding}."}


def scripted_llm_app(delay_s: float = 0.0, slow_s: float = 2.0):
    """A FastAPI app answering ``POST /v1/chat/completions`` from the caption in the prompt (stateless except for
    the first-call faults): MALFORMED -> broken JSON until the retry prompt; LEAK -> always a leaking question;
    RATE -> a 429 on the first request; SLOW -> the first request sleeps ``slow_s``; DOWN -> always 500;
    GARBAGE -> a 200 whose body is not a chat completion. ``app.state.calls`` counts requests per caption."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse

    app = FastAPI()
    app.state.calls = {}
    lock = threading.Lock()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        import asyncio

        body = await request.json()
        user = body["messages"][1]["content"]
        caption = user.split("Caption: ", 1)[1].split("\n", 1)[0]
        retry = len(body["messages"]) > 2
        with lock:
            n = app.state.calls[caption] = app.state.calls.get(caption, 0) + 1
        assert body["response_format"]["type"] == "json_schema"
        if delay_s:
            await asyncio.sleep(delay_s)
        if "DOWN" in caption:
            return PlainTextResponse("overloaded", status_code=500)
        if "RATE" in caption and n == 1:
            return JSONResponse({"error": {"message": "slow down"}}, status_code=429, headers={"Retry-After": "0"})
        if "SLOW" in caption and n == 1:
            await asyncio.sleep(slow_s)
        if "GARBAGE" in caption and n == 1:
            return JSONResponse({"unexpected": True})
        reply = good_reply(caption)
        if "LEAK" in caption:
            reply["question"] = f"Is this {reply['options'][reply['answer']]}? Which finding is it?"
        content = json.dumps(reply)
        if "MALFORMED" in caption and not retry:
            content = content[:25]
        return {"id": "x", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": len(user.split()), "completion_tokens": len(content.split()),
                          "total_tokens": 0}}

    return app


@pytest.fixture
def pairs_dir(tmp_path):
    return make_pairs(tmp_path / "in")
