"""Shared test setup: offline, CPU-only, deterministic. Tiny models are built once per session."""

from __future__ import annotations

import os

# Tests never reach a model hub and never use a GPU, whatever the machine has.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["CUDA_VISIBLE_DEVICES"] = ""


# --- tiny real models (medrwr.testing), built once per session into the user cache ----------------------
# (set MEDRWR_CACHE_DIR to move the cache; the folders are keyed by medrwr.testing.BUILD_VERSION)

import pytest


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """MEDRWR_CACHE_DIR pointed at one per-session folder, so KB/encoder builds are isolated from the user's cache."""
    d = tmp_path_factory.getbasetemp() / "medrwr-shared-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDRWR_CACHE_DIR", str(d))
        yield d


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The real Qwen2.5-VL tokenizer rebuilt offline (left padding, eos <|im_end|>, pad <|endoftext|>)."""
    from medrwr.testing import qwen2_5_tokenizer

    return qwen2_5_tokenizer()


@pytest.fixture(scope="session")
def tiny_vlm_dir():
    """Folder of a tiny random Qwen2.5-VL + processor (load with medrwr...processing.load_processor)."""
    from medrwr.testing import tiny_qwen2_5_vl

    return tiny_qwen2_5_vl()


@pytest.fixture(scope="session")
def tiny_lm_dir():
    """Folder of a tiny random text-only Qwen2ForCausalLM + the Qwen2.5 tokenizer."""
    from medrwr.testing import tiny_causal_lm

    return tiny_causal_lm()


@pytest.fixture(scope="session")
def tiny_clip_dir():
    """Folder of a tiny random CLIPModel + CLIPProcessor (projection dim 32)."""
    from medrwr.testing import tiny_clip

    return tiny_clip()
