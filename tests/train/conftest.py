"""Fixtures for the training tests: a real tiny BM25 index, scripted tiny policies, configs sized for CPU."""

from __future__ import annotations

import pytest

SCRIPT_WITH_QUERY = [
    "<think>need facts</think><query>pneumonia fever</query>",
    "<think>read them</think><answer>",  # + the free letter + "</answer>" (see scripted_backend)
]


@pytest.fixture(scope="session")
def bm25_index(tmp_path_factory):
    """A real BM25-only index of 12 short passages (medrwr.retrieval.index.hybrid.build_index)."""
    from medrwr.retrieval.index.corpus import Document
    from medrwr.retrieval.index.hybrid import build_index

    docs = [Document(f"d{i}", "Pneumonia", f"Pneumonia causes fever and cough; finding {i} on chest films.")
            for i in range(12)]
    return build_index(docs, tmp_path_factory.mktemp("idx") / "bm25", dense=False, show_progress=False)


def scripted_backend(model_dir, letters="AB", query=True, seed=0):
    """An HF backend on ``model_dir`` whose generation follows the protocol; only the answer letter is free."""
    import torch

    from medrwr.rollout.backends.hf import load_hf_policy
    from medrwr.testing import FREE, ForcedTranscript

    torch.manual_seed(seed)
    backend = load_hf_policy(model_dir, temperature=1.0, seed=seed)
    tok = backend.tokenizer
    hole = FREE(1, [tok.convert_tokens_to_ids(c) for c in letters])
    last = ["<think>read them</think><answer>" if query else "<think>easy</think><answer>", hole, "</answer>"]
    script = [SCRIPT_WITH_QUERY[0], last] if query else [last]
    backend.logits_processors = [ForcedTranscript(tok, script)]
    return backend


def train_config(model_dir, index=None, *extra):
    """A CPU-sized config: groups of 4, short budgets, bm25 retrieval on ``index``."""
    from medrwr.config import load_config

    sets = [
        f"model.name={model_dir}", "model.threads=1", "rollout.temperature=1.0", "rollout.max_new_tokens_per_turn=32",
        "rollout.max_total_new_tokens=64", "rollout.max_inserted_tokens=48", "rollout.max_rounds=1",
        "train.num_generations=4", "train.per_device_batch_size=4", "train.max_steps=1",
        "rewards.query_weight=0", "rewards.confidence_weight=0", "retrieval.mode=bm25", "retrieval.k=2",
    ]
    if index is not None:
        sets.append(f"retrieval.index={index}")
    return load_config(None, sets + list(extra))


def mcq_rows(n=4, answer="A", images=None, options=("fever", "rash")):
    """``n`` small MCQ samples (same answer), optionally with one image each."""
    from medrwr.train.data import MCQSample, build_dataset

    samples = [MCQSample(f"Which finding {i}?", list(options), answer, "Pneumonia causes fever.",
                         [images] if images is not None else []) for i in range(n)]
    return build_dataset(samples)
