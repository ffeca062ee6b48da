"""``medrwr data synth`` stage by stage on synthetic pairs, against a scripted OpenAI-compatible server on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import make_pairs, scripted_llm_app

from medrwr.config import load_config
from medrwr.data.journal import read_jsonl
from medrwr.data.pairs import read_pairs
from medrwr.errors import SynthesisError

FAULTS = {0: "MALFORMED", 1: "LEAK", 2: "RATE", 3: "SLOW", 4: "DOWN", 5: "GARBAGE"}
FAST = ["data.backoff_s=0.01", "data.timeout_s=0.4", "data.http_retries=2", "data.oversample=1.0"]


def _cfg(*sets):
    return load_config(None, [*FAST, *sets])


# ------------------------------------------------------------------------------------------------ select


def test_select_samples_across_clusters_and_resumes(tmp_path):
    from medrwr.data.select import run_select

    pairs = read_pairs(*make_pairs(tmp_path / "in", 24))
    cfg = _cfg("data.n=6", "data.clusters=3").data
    res = run_select(pairs, tmp_path / "a", cfg, chunk=5)
    rows = read_jsonl(res.path)
    assert (res.pairs, res.clusters, res.selected) == (24, 3, 6)
    assert sorted(res.cluster_sizes) == [8, 8, 8] and res.selected_per_cluster == [2, 2, 2]
    groups = [r["caption"].split()[0] for r in rows]
    assert sorted(groups) == ["dark", "dark", "rings", "rings", "stripes", "stripes"]  # every image group sampled
    assert res.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert rows[0]["provenance"] == {"license": "CC0", "source": "synthetic"} or rows[0]["provenance"]["license"]

    def stop_at_2(c):
        if c == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # interrupted after three of five embedding chunks
        run_select(pairs, tmp_path / "b", cfg, on_chunk=stop_at_2, chunk=5)
    assert not (tmp_path / "b" / "select.jsonl").exists()
    redone: list[int] = []
    run_select(pairs, tmp_path / "b", cfg, on_chunk=redone.append, chunk=5)
    assert redone == [3, 4]  # only the missing chunks were embedded again
    assert (tmp_path / "b" / "select.jsonl").read_bytes() == res.path.read_bytes()


def test_bad_pairs_fail_early_with_one_line(tmp_path):
    pairs, images = make_pairs(tmp_path / "in", 3)
    (images / "img001.png").unlink()
    with pytest.raises(SynthesisError, match=r"pairs.jsonl:2: image 'img001.png' not found under .*--images"):
        read_pairs(pairs, images)
    from medrwr.cli.app import main

    assert main(["data", "synth", "--pairs", str(pairs), "--images", str(images), "--out", str(tmp_path / "o"),
                 "--stages", "select"]) == 1
    pairs2, images2 = make_pairs(tmp_path / "in2", 3)
    with pytest.raises(SynthesisError, match="needs --llm-url and --llm-model"):
        from medrwr.data.synth import synthesize

        synthesize(_cfg(), pairs2, images2, tmp_path / "o2", llm_url=None, llm_model=None)


# ------------------------------------------------------------------------------------------------ write


def test_write_retries_skips_and_counts_faults(tmp_path, loopback_server):
    from medrwr.data.synth import synthesize
    from medrwr.train.data import read_rows, samples_from_rows

    pairs, images = make_pairs(tmp_path / "in", 12, FAULTS)
    cfg = _cfg("data.n=12", "data.concurrency=4")
    app = scripted_llm_app(slow_s=1.0)
    out = tmp_path / "out"
    with loopback_server(app) as srv:
        url = srv.url + "/v1"
        rep = synthesize(cfg, pairs, images, out, llm_url=url, llm_model="m", stages=("select", "write"),
                         show_progress=False)
        w = rep.stages["write"]
        assert (w["captions"], w["ok"], w["invalid"], w["failed"]) == (12, 10, 1, 1)
        assert w["invalid_reasons"] == {"the question contains the correct option": 1}
        u = w["usage"]
        assert u["rate_limited"] == 1 and u["timeouts"] >= 1 and u["server_errors"] == 3 and u["retries"] >= 5
        assert u["prompt_tokens"] > 0 and u["completion_tokens"] > 0
        recs = {r["id"]: r for r in read_jsonl(out / "write.jsonl")}
        assert recs["p000"]["attempts"] == 2 and recs["p001"]["attempts"] == 3 and "p004" not in recs
        calls = dict(app.state.calls)
        first = (out / "write.jsonl").read_bytes()

        # rerun: journalled captions are skipped; the failed one is retried (and fails again)
        rep2 = synthesize(cfg, pairs, images, out, llm_url=url, llm_model="m", stages=("write",),
                          show_progress=False)
        assert rep2.stages["write"]["failed"] == 1
        changed = {k for k in app.state.calls if app.state.calls[k] != calls.get(k)}
        assert changed == {c for c in calls if "DOWN" in c}
        # the cache: without the journal every caption is answered from disk, same result, no new request
        (out / "write" / "journal.jsonl").unlink()
        calls = dict(app.state.calls)
        rep3 = synthesize(cfg, pairs, images, out, llm_url=url, llm_model="m", stages=("write",),
                          show_progress=False)
        assert rep3.stages["write"]["usage"]["cache_hits"] == 10 + 1 + 3  # first prompts, the malformed retry, leak retries
        assert {k for k in app.state.calls if app.state.calls[k] != calls.get(k)} == {c for c in calls if "DOWN" in c}
        assert (out / "write.jsonl").read_bytes() == first

    rows = read_rows(out / "data.jsonl")  # the training loader reads the output as it is
    samples = samples_from_rows(rows, "auto", str(out / "data.jsonl"), out)
    assert len(samples) == 10 and all(len(s.images) == 1 and os.path.isfile(s.images[0]) for s in samples)
    assert set(rows[0]) >= {"images", "question", "options", "answer", "explanation"}
    assert all(r["options"][r["answer"]] in r["explanation"] for r in rows)
    card = json.loads((out / "data_card.json").read_text())
    assert card["questions"] == 10 and card["licences"] == {"CC BY 4.0": 5, "CC0": 5}
    assert card["counts"]["select"]["selected"] == 12 and card["counts"]["write"]["failed"] == 1


def _lines(path):
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_kill9_mid_write_then_resume_gives_the_same_files(tmp_path, loopback_server):
    from medrwr.data.synth import synthesize

    pairs, images = make_pairs(tmp_path / "in", 16)
    sets = [*FAST, "data.n=16", "data.concurrency=2"]
    cmd = [sys.executable, "-m", "medrwr.cli", "data", "synth", "--pairs", str(pairs), "--images", str(images),
           "--out", str(tmp_path / "b"), "--llm-model", "m", "--stages", "select,write", "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with loopback_server(scripted_llm_app(delay_s=0.15)) as srv:
        url = srv.url + "/v1"
        synthesize(load_config(None, sets), pairs, images, tmp_path / "a", llm_url=url, llm_model="m",
                   stages=("select", "write"), show_progress=False)
        journal = tmp_path / "b" / "write" / "journal.jsonl"
        proc = subprocess.Popen([*cmd, "--llm-url", url], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while _lines(journal) < 4 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        done = _lines(journal)
        assert 4 <= done < 16, proc.stderr.read().decode()[-2000:]
        assert not (tmp_path / "b" / "data.jsonl").exists()
        with open(journal, "a") as f:  # what a kill in the middle of a write leaves: a torn last line
            f.write('{"id": "p0')
        r = subprocess.run([*cmd, "--llm-url", url], env=env, capture_output=True, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
    ids = [json.loads(x)["id"] for x in journal.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 16  # no duplicate, no loss
    for name in ("select.jsonl", "write.jsonl", "data.jsonl"):
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes(), name


# ------------------------------------------------------------------------------------------------ stratify


def _items(tmp_path, n_items):
    pairs = read_pairs(*make_pairs(tmp_path / "in", n_items))
    items = []
    for i, p in enumerate(pairs):
        opts = {"A": "pneumothorax", "B": "effusion", "C": "fracture", "D": "normal"}
        items.append({"id": p.id, "status": "ok", "pair": p.to_dict(),
                      "mcq": {"question": "Which finding?", "options": opts, "answer": "ABCD"[i % 4],
                              "explanation": ""}})
    return items


class _Spy:
    """Delegates to an engine; records requests; raises after ``stop_after`` questions (an interruption)."""

    def __init__(self, engine, stop_after=None):
        self.engine, self.stop_after, self.requests = engine, stop_after, []

    def run(self, reqs):
        if self.stop_after is not None and len(self.requests) >= self.stop_after:
            raise KeyboardInterrupt
        self.requests.append(list(reqs))
        return self.engine.run(reqs)


def test_stratify_keeps_the_band_and_resumes(tmp_path, qwen_tokenizer):
    from medrwr.data.stratify import direct_engine, run_stratify
    from medrwr.rollout.backends.base import ScriptedBackend

    n = 4
    correct = {"p000": 0, "p001": 1, "p002": 3, "p003": 4}  # answers A, B, C, D
    items = _items(tmp_path, 4)

    def backend():
        scripts = {}
        for it in items:
            gold = it["mcq"]["answer"]
            wrong = "D" if gold != "D" else "A"
            for j in range(n):
                scripts[f"{it['id']}#{j}"] = f"<think>look</think><answer>{gold if j < correct[it['id']] else wrong}</answer>"
        return ScriptedBackend(qwen_tokenizer, scripts, supports_images=True)

    cfg = _cfg(f"data.samples={n}", "rollout.constrain=none")
    spy = _Spy(direct_engine(cfg, backend=backend()))
    res = run_stratify(items, tmp_path / "a", cfg.data, spy, show_progress=False)
    assert (res.total, res.kept) == (4, 2)
    assert res.distribution == {0: 1, 1: 1, 2: 0, 3: 1, 4: 1}
    rows = read_jsonl(res.path)
    assert [r["kept"] for r in rows] == [False, True, True, False]
    assert spy.engine.config.max_rounds == 0 and len(spy.requests[0]) == n
    assert all("<query>" not in r.system and r.images for r in spy.requests[0])  # direct mode, with the image

    interrupted = _Spy(direct_engine(cfg, backend=backend()), stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        run_stratify(items, tmp_path / "b", cfg.data, interrupted, show_progress=False)
    resumed = _Spy(direct_engine(cfg, backend=backend()))
    run_stratify(items, tmp_path / "b", cfg.data, resumed, show_progress=False)
    assert [r[0].request_id for r in resumed.requests] == ["p002#0", "p003#0"]
    assert (tmp_path / "b" / "stratify.jsonl").read_bytes() == res.path.read_bytes()

    wide = _cfg(f"data.samples={n}", "data.band=[-1, 2]").data  # a new band re-reads the journal, no new run
    assert run_stratify(items, tmp_path / "b", wide, _Spy(None, stop_after=0), show_progress=False).kept == 4


def test_stratify_runs_the_tiny_policy(tmp_path, tiny_vlm_dir):
    from medrwr.data.stratify import direct_engine, run_stratify

    items = _items(tmp_path, 1)
    cfg = _cfg("data.samples=3", f"model.name={tiny_vlm_dir}", "rollout.max_new_tokens_per_turn=24",
               "rollout.max_total_new_tokens=24", "rollout.constrain=protocol", "rollout.constrain_max_think_tokens=4")
    res = run_stratify(items, tmp_path / "s", cfg.data, direct_engine(cfg), show_progress=False)
    rows = read_jsonl(res.path)
    assert [len(r["choices"]) for r in rows] == [3] and sum(res.distribution.values()) == 1
    assert all(c in "ABCD" for r in rows for c in r["choices"])  # constrained: the tiny model answers a letter
