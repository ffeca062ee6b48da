"""Tiny randomly initialised models on the real Qwen vocabulary: Qwen2.5-VL, a text-only Qwen2, and CLIP.

Fixed seeds and cached folders (:mod:`medrwr.testing.cache`), so every build is the same model.
"""

from __future__ import annotations

import os
from pathlib import Path

from medrwr.testing.cache import _build_dir, _default
from medrwr.testing.tokenizer import QWEN_SPECIAL_TOKENS, QWEN_VOCAB_SIZE, _cached_tokenizer, _tokenizer_dir

__all__ = ["tiny_causal_lm", "tiny_clip", "tiny_qwen2_5_vl"]


def _seeded(seed: int = 0):
    import torch

    torch.manual_seed(seed)


def _qwen_vl_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    return Qwen2VLImageProcessorPil()


def _generation_config(model) -> None:
    ids = QWEN_SPECIAL_TOKENS
    gc = model.generation_config
    gc.eos_token_id = [ids["<|im_end|>"][0], ids["<|endoftext|>"][0]]
    gc.pad_token_id = ids["<|endoftext|>"][0]
    gc.bos_token_id = ids["<|endoftext|>"][0]
    gc.do_sample = False


def tiny_qwen2_5_vl(path: str | os.PathLike | None = None) -> Path:
    """A tiny random Qwen2.5-VL (≈10 M params, mostly the 151,936-row embedding) with its processor.

    Load with ``Qwen2_5_VLForConditionalGeneration.from_pretrained(folder)`` and
    ``medrwr.rollout.backends.processing.load_processor(folder)``.
    """

    def build(folder: Path) -> None:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        from medrwr.rollout.backends.processing import make_processor

        ids = {t: i for t, (i, _) in QWEN_SPECIAL_TOKENS.items()}
        text = {
            "vocab_size": QWEN_VOCAB_SIZE,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "tie_word_embeddings": True,
        }
        vision = {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "fullatt_block_indexes": [1],
            "window_size": 112,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        }
        config = Qwen2_5_VLConfig(
            text_config=text,
            vision_config=vision,
            tie_word_embeddings=True,
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
        )
        _seeded(0)
        model = Qwen2_5_VLForConditionalGeneration(config).eval()
        _generation_config(model)
        model.save_pretrained(folder)
        make_processor(_qwen_vl_image_processor(), _cached_tokenizer()).save_pretrained(folder)

    return _build_dir(_default(path, "tiny_qwen2_5_vl"), build)


def tiny_causal_lm(path: str | os.PathLike | None = None) -> Path:
    """A tiny random text-only ``Qwen2ForCausalLM`` with the Qwen2.5 tokenizer (``AutoModelForCausalLM``)."""

    def build(folder: Path) -> None:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        ids = {t: i for t, (i, _) in QWEN_SPECIAL_TOKENS.items()}
        config = Qwen2Config(
            vocab_size=QWEN_VOCAB_SIZE,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=True,
        )
        _seeded(0)
        model = Qwen2ForCausalLM(config).eval()
        _generation_config(model)
        model.save_pretrained(folder)
        _cached_tokenizer().save_pretrained(folder)

    return _build_dir(_default(path, "tiny_causal_lm"), build)


def tiny_clip(path: str | os.PathLike | None = None) -> Path:
    """A tiny random ``CLIPModel`` (projection dim 32, 32x32 images) with a tokenizer and image processor.

    The tokenizer is the Qwen2.5 vocabulary with ``<|endoftext|>`` appended as CLIP's end token (the text
    tower pools there) and right padding; load it with ``AutoTokenizer`` and the images with
    ``CLIPImageProcessor`` (or ``AutoProcessor`` for both).
    """

    def build(folder: Path) -> None:
        from tokenizers import processors
        from transformers import AutoTokenizer, CLIPConfig, CLIPModel, CLIPProcessor
        from transformers.models.clip.image_processing_pil_clip import (
            CLIPImageProcessorPil,
        )

        eot = QWEN_SPECIAL_TOKENS["<|endoftext|>"][0]
        tok = AutoTokenizer.from_pretrained(_tokenizer_dir(), padding_side="right", model_max_length=77)
        tok._tokenizer.post_processor = processors.TemplateProcessing(
            single="$A <|endoftext|>",
            pair="$A <|endoftext|> $B <|endoftext|>",
            special_tokens=[("<|endoftext|>", eot)],
        )
        tok.chat_template = None
        config = CLIPConfig(
            text_config={
                "vocab_size": QWEN_VOCAB_SIZE,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "max_position_embeddings": 77,
                "eos_token_id": eot,
                "pad_token_id": eot,
                "bos_token_id": eot,
                "projection_dim": 32,
            },
            vision_config={
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "image_size": 32,
                "patch_size": 8,
                "projection_dim": 32,
            },
            projection_dim=32,
        )
        _seeded(0)
        model = CLIPModel(config).eval()
        model.save_pretrained(folder)
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        )
        CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(folder)

    return _build_dir(_default(path, "tiny_clip"), build)
