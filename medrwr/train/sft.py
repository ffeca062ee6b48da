"""SFT cold start (``train.stage: 0``): protocol transcripts built from a dataset, trained with TRL's ``SFTTrainer``.

Each question becomes one token-exact transcript, written as the rollout engine would write it:

* with retrieval (``rollout.max_rounds > 0`` and a retriever): ``<think>…</think><query>Q</query>`` (model) +
  ``\\n<retrieve>…</retrieve>\\n`` (inserted: the top-``retrieval.k`` documents for ``Q``, tokenised on their own,
  **mask 0**) + ``<think>explanation</think><answer>X</answer>`` (model) + the end-of-turn token (model, trained);
* without: ``<think>explanation</think><answer>X</answer>`` + the end token.

``Q`` is the question's first sentence (at most 24 words); the explanation is the dataset's ``explanation``
(MedMCQA ``exp``), or "The answer is X: <option>." when it has none; ``<``/``>`` in it become ``‹``/``›`` (model
blocks may not hold them). The prompt ids are the policy backend's (the chat template the rollout uses).

Rows go to TRL pre-tokenised: ``input_ids`` and a per-token ``completion_mask`` (0 on the prompt and on retrieve
blocks). TRL 1.16 turns ``completion_mask`` into labels **only** with ``completion_only_loss=True``, which is
set here; otherwise it silently trains every token. With images (a VLM) TRL's vision collator would re-tokenise
the text and lose the mask, so :class:`VLMCollator` batches our ids and masks and adds ``pixel_values``,
``image_grid_thw`` and ``mm_token_type_ids`` (dataset preparation skipped).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Sequence

from medrwr import protocol
from medrwr.config import Config
from medrwr.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["VLMCollator", "build_sft_config", "build_sft_trainer", "sft_examples"]


def _model_text(text: str) -> str:
    return " ".join(text.replace("<", "‹").replace(">", "›").split())


def _query(question: str) -> str:
    first = re.split(r"(?<=[.?!])\s", question.strip(), maxsplit=1)[0]
    return _model_text(" ".join(first.split()[:24]))


def _messages(row: dict[str, Any], images: Sequence[Any]) -> list[dict[str, Any]]:
    msgs = [dict(m) for m in row["prompt"]]
    if images:
        user = msgs[-1]
        user["content"] = [*({"type": "image", "image": im} for im in images), {"type": "text", "text": user["content"]}]
    return msgs


def sft_examples(cfg: Config, dataset: Any, backend: Any, retriever: Any = None) -> list[dict[str, Any]]:
    """One pre-tokenised transcript per row: ``input_ids``, ``completion_mask`` (+ ``images``)."""
    tok = backend.tokenizer
    encode = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    end = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else tok.eos_token_id
    rows = list(dataset)
    use_retrieval = cfg.rollout.max_rounds > 0 and retriever is not None
    hits: list[list[Any]] = [[] for _ in rows]
    if use_retrieval:
        hits = retriever.search([_query(r["prompt"][-1]["content"]) for r in rows], k=cfg.retrieval.k)
    out = []
    for row, row_hits in zip(rows, hits):
        images = list(row.get("images") or [])
        prompt = backend.prepare_prompt(_messages(row, images), images).prompt_ids
        letter = row["answer"]
        options = dict(zip(protocol.OPTION_LETTERS, row["options"]))
        why = _model_text(row.get("explanation") or "") or f"The answer is {letter}: {_model_text(options[letter])}."
        pieces: list[tuple[str, int]] = []
        if use_retrieval:
            question = row["prompt"][-1]["content"].split("\n")[0]
            pieces.append(("<think>I should look up the key facts before answering.</think>"
                           f"<query>{_query(question)}</query>", 1))
            pieces.append(("\n" + protocol.format_retrieval([h.text for h in row_hits]), 0))
        pieces.append((f"<think>{why}</think><answer>{letter}</answer>", 1))
        ids, mask = list(prompt), [0] * len(prompt)
        for text, m in pieces:
            piece = encode(text)
            ids += piece
            mask += [m] * len(piece)
        ids.append(end)
        mask.append(1)
        example: dict[str, Any] = {"input_ids": ids, "completion_mask": mask}
        if images:
            example["images"] = images
        out.append(example)
    return out


class VLMCollator:
    """Pads pre-tokenised VLM rows (left, like the rollout) and adds the image tensors the forward needs."""

    def __init__(self, processor: Any, pad_token_id: int):
        self.processor = processor
        self.pad = pad_token_id
        self.image_token_id = processor.tokenizer.convert_tokens_to_ids(getattr(processor, "image_token", "<|image_pad|>"))

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for b, e in enumerate(examples):
            n = len(e["input_ids"])
            row = torch.as_tensor(e["input_ids"], dtype=torch.long)
            ids[b, width - n:] = row
            attn[b, width - n:] = 1
            keep = torch.as_tensor(e["completion_mask"], dtype=torch.bool)
            labels[b, width - n:] = torch.where(keep, row, torch.full_like(row, -100))
        batch = {"input_ids": ids, "attention_mask": attn, "labels": labels}
        images = [im for e in examples for im in (e.get("images") or [])]
        if images:
            enc = self.processor.image_processor(images=images, return_tensors="pt")
            batch["pixel_values"] = enc["pixel_values"]
            batch["image_grid_thw"] = enc["image_grid_thw"]
            batch["mm_token_type_ids"] = (ids == self.image_token_id).long() * attn
        return batch


def build_sft_config(cfg: Config, output_dir: str | Path, *, vision: bool = False) -> Any:
    """``trl.SFTConfig`` from ``train.*`` (learning rate, batch, epochs...), the rest from ``train.trl``."""
    import torch
    from trl import SFTConfig

    t = cfg.train
    cpu = not torch.cuda.is_available()
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir), per_device_train_batch_size=t.per_device_batch_size,
        learning_rate=t.learning_rate, warmup_steps=t.warmup_ratio, num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps, seed=t.seed, data_seed=t.seed, bf16=t.bf16 and not cpu, use_cpu=cpu,
        completion_only_loss=True,  # the only way TRL 1.16 reads our per-token completion_mask
        max_length=None, gradient_checkpointing=not cpu, logging_steps=1, save_steps=50, report_to="none",
    )
    if vision:
        kwargs.update(remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True})
    valid = set(SFTConfig.__dataclass_fields__)
    for key, value in t.trl.items():
        if key not in valid:
            raise ConfigError(f"train.trl.{key} is not an SFTConfig field (TRL 1.16); see trl.SFTConfig")
        kwargs[key] = value
    if kwargs.get("completion_only_loss") is not True:
        raise ConfigError("train.trl.completion_only_loss must stay true: without it TRL trains retrieved tokens")
    return SFTConfig(**kwargs)


def build_sft_trainer(
    cfg: Config, dataset: Any, output_dir: str | Path, *, backend: Any = None, retriever: Any = None,
    callbacks: Sequence[Any] = (),
) -> tuple[Any, Any]:
    """``(SFTTrainer, processor)`` over the transcripts of :func:`sft_examples`."""
    from datasets import Dataset
    from trl import SFTTrainer

    from medrwr.rollout.backends import build_backend
    from medrwr.train.grpo import peft_config

    if backend is None:
        backend = build_backend(cfg.model, cfg.rollout)
    vision = "images" in dataset.column_names
    if vision and not backend.supports_images:
        raise ConfigError("the dataset has images but the policy is text-only; use a VLM (model.name)")
    if retriever is None and cfg.rollout.max_rounds > 0:
        from medrwr.retrieval.open import open_retriever

        retriever = open_retriever(cfg)
    examples = sft_examples(cfg, dataset, backend, retriever)
    train = Dataset.from_list(examples)
    args = build_sft_config(cfg, output_dir, vision=vision)
    model = backend.model
    model.train()
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=train, processing_class=backend.processor, callbacks=list(callbacks),
        data_collator=VLMCollator(backend.processor, backend.pad_token_id) if vision else None,
        peft_config=peft_config(cfg),
    )
    return trainer, backend.processor
