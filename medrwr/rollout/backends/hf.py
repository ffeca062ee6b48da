"""The transformers backend: ``model.generate`` on CPU or GPU, for text-only causal LMs and Qwen2.5-VL-style VLMs.

* **Token ids in, token ids out.** Rows are left-padded per call; the new tokens of each row are returned
  exactly as sampled (checked: the returned sequences start with the ids we fed).
* **Stops.** A stopping criterion decodes the last few *new* tokens of each unfinished row and stops it at the
  first stop string (the token that completed it is kept whole), an end-of-sequence token, or its own budget.
  Rows have their own budgets inside one batched call.
* **Log-probabilities without storing logits.** A logits processor placed before every other processor sees
  the raw logits at each step; it keeps each row's log-normaliser, the log-probabilities of the watched ids
  (the option letters) and optionally the top-N, and reads the sampled token's log-probability one step later.
  No ``[steps, batch, vocab]`` tensor is kept (``output_logits`` would need gigabytes on a 151k vocabulary).
* **Images on every turn** (uncached). Each call re-supplies every image of a row (``pixel_values``, ``image_grid_thw``)
  with ``mm_token_type_ids``, which transformers 5 needs to compute Qwen2.5-VL's M-RoPE positions.
* **Sampling settings are explicit.** Fields left unset in a ``GenerationConfig`` are filled from the
  checkpoint's (Qwen2.5-VL ships ``top_k=1, repetition_penalty=1.05``), so every knob is set here.
* **Constrained decoding** (``constraints=``, :mod:`medrwr.rollout.constrain`): a grammar processor placed
  right after the recorder masks each constrained row to the tokens its turn grammar allows (one llguidance
  matcher per row, fresh every call). The recorder still sees the raw logits, so the recorded log-probabilities
  stay the model's own (``constrained_logprobs = "raw"``). Without constraints nothing changes.
* **Stragglers.** ``model.generate`` keeps computing rows that finished, so one long row costs a full batch per
  step. Greedy, with the KV store on (text models) and no caller-supplied logits processors: once at most a
  quarter of a call of four or more rows is still running (each with more than ``PAUSE_MIN_LEFT`` tokens of
  budget left), the call ends and those rows continue in a smaller call from their kept keys. Their tokens,
  log-probabilities, grammar state (the matcher replays them) and stop-string window carry over
  (:mod:`.hf_steps`); the outputs are those of one call. Sampling never pauses: a smaller batch would draw
  other random numbers.
* **KV-cache reuse** (``kv_cache=``, :mod:`.kv_cache`, :mod:`.kv_cache_vl`): rows continue from their kept
  keys/values; a VLM then gets only the images not yet cached, with M-RoPE positions passed explicitly.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medrwr.rollout.backends.base import (
    BackendError,
    Continuation,
    GenerationState,
    MultimodalInputs,
    PromptInputs,
    per_row_budgets,
)
from medrwr.rollout.backends.attention import use_grouped_sdpa
from medrwr.rollout.backends.hf_steps import Recorder, Stops, _torch
from medrwr.rollout.backends.kv_cache import resolve_kv_cache
from medrwr.rollout.backends.policy_cache import (
    cache_writable,
    check_hub_id,
    convert_gguf_policy,
    into_own_memory,
    load_gguf_directly,
    quiet_transformers,
)
from medrwr.rollout.backends.processing import image_placeholder_ids, render_chat

logger = logging.getLogger(__name__)

__all__ = ["HFBackend", "load_hf_policy"]

class HFBackend:
    """A transformers model (+ its processor or tokenizer) behind the :class:`PolicyBackend` interface.

    ``logits_processors`` run after the log-probability recorder (tests pass a scripted-transcript forcer);
    ``temperature=0`` is greedy decoding.
    """

    supports_constraints = True
    constrained_logprobs = "raw"
    supports_token_callback = True
    """``generate(on_token=fn)``: ``fn(row, token_id)`` after each sampled token; returning True stops that row."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        logits_processors: Sequence[Any] = (),
        top_logprobs: int = 0,
        kv_cache: str = "off",
    ):
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", None) or processor
        self.image_processor = getattr(processor, "image_processor", None)
        self.supports_images = self.image_processor is not None and hasattr(getattr(model, "config", None), "vision_config")
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.seed = seed
        self.logits_processors = list(logits_processors)
        self.top_logprobs = top_logprobs
        self._eos = self._find_eos()
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = getattr(model.generation_config, "pad_token_id", None)
        if isinstance(pad, (list, tuple)):
            pad = pad[0]
        self.pad_token_id = int(pad) if pad is not None else min(self._eos)
        self.image_token_id = self._token_id(getattr(processor, "image_token", None) or "<|image_pad|>")
        self.video_token_id = self._token_id(getattr(processor, "video_token", None) or "<|video_pad|>")
        self.forward_calls = 0
        self.kv_cache = resolve_kv_cache(model, kv_cache, self.pad_token_id)  # keys/values kept across turns

    # ------------------------------------------------------------------ helpers

    def _token_id(self, token: str) -> int | None:
        vocab = self.tokenizer.get_vocab() if hasattr(self.tokenizer, "get_vocab") else {}
        tid = vocab.get(token)
        if tid is None and hasattr(self.tokenizer, "added_tokens_encoder"):
            tid = self.tokenizer.added_tokens_encoder.get(token)
        return tid

    def _find_eos(self) -> set[int]:
        ids: set[int] = set()
        gc_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for src in (gc_eos, self.tokenizer.eos_token_id):
            if src is None:
                continue
            ids.update(int(x) for x in (src if isinstance(src, (list, tuple)) else [src]))
        if not ids:
            raise BackendError("the model has no end-of-sequence token id (set generation_config.eos_token_id)")
        return ids

    def eos_token_ids(self) -> set[int]:
        return set(self._eos)

    @property
    def device(self):
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ prompts and images

    def prepare_prompt(self, messages: list[dict[str, Any]], images: Sequence[Any] = ()) -> PromptInputs:
        """Render with the chat template; for a VLM exactly ``processor.apply_chat_template(..., tokenize=True)``."""
        ids, enc = render_chat(self.processor, messages, self.supports_images)
        mm = None
        if enc is not None and "pixel_values" in enc and enc.get("image_grid_thw") is not None:
            mm = self._split_images(enc["pixel_values"], enc["image_grid_thw"], list(images))
        return PromptInputs(prompt_ids=ids, mm=mm)

    def _split_images(self, pixel_values, grid_thw, images: list[Any]) -> MultimodalInputs:
        rows = [int(g.prod()) for g in grid_thw]
        pv, grids, at = [], [], 0
        for i, n in enumerate(rows):
            pv.append(pixel_values[at : at + n])
            grids.append(grid_thw[i : i + 1])
            at += n
        if at != pixel_values.shape[0]:
            raise BackendError(f"pixel_values has {pixel_values.shape[0]} rows, image_grid_thw says {at}")
        imgs = images if len(images) == len(rows) else [None] * len(rows)
        return MultimodalInputs(images=list(imgs), data={"pixel_values": pv, "image_grid_thw": grids})

    def encode_image(self, image: Any) -> tuple[list[int], MultimodalInputs]:
        """Placeholder ids (``<|vision_start|><|image_pad|>×n<|vision_end|>``) and model inputs for one image."""
        if not self.supports_images:
            raise BackendError(
                "CDIR inserts an image, which needs a vision-language model "
                "(e.g. --model Qwen/Qwen2.5-VL-7B-Instruct or a local Qwen2.5-VL folder)"
            )
        ids, out = image_placeholder_ids(self.processor, image)
        mm = MultimodalInputs(
            images=[image], data={"pixel_values": [out["pixel_values"]], "image_grid_thw": [out["image_grid_thw"]]}
        )
        return ids, mm

    # ------------------------------------------------------------------ generation

    def _generation_config(self, max_new: int):
        from transformers import GenerationConfig

        sample = self.temperature > 0
        return GenerationConfig(
            max_new_tokens=max_new,
            min_new_tokens=0,
            do_sample=sample,
            temperature=self.temperature if sample else 1.0,
            top_p=self.top_p if sample else 1.0,
            top_k=self.top_k if sample else None,  # greedy: unset (transformers warns on a value it ignores)
            min_p=0.0 if sample else None,
            typical_p=1.0,
            epsilon_cutoff=0.0,
            eta_cutoff=0.0,
            repetition_penalty=1.0,
            encoder_repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            num_beams=1,
            num_return_sequences=1,
            eos_token_id=sorted(self._eos),
            pad_token_id=self.pad_token_id,
            return_dict_in_generate=False,
            use_cache=True,
        )

    def _batch(self, states: Sequence[GenerationState]) -> dict[str, Any]:
        torch = _torch()
        width = max(len(s.ids) for s in states)
        ids = torch.full((len(states), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(states), width), dtype=torch.long)
        for b, s in enumerate(states):
            if not s.ids:
                raise BackendError("a generation state has no ids (the prompt is empty)")
            ids[b, width - len(s.ids) :] = torch.as_tensor(s.ids, dtype=torch.long)
            mask[b, width - len(s.ids) :] = 1
        batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        pv = [t for s in states if s.mm for t in s.mm.data.get("pixel_values", [])]
        grids = [g for s in states if s.mm for g in s.mm.data.get("image_grid_thw", [])]
        n_pad = int((ids == self.image_token_id).sum()) if self.image_token_id is not None else 0
        if pv:
            if not self.supports_images:
                raise BackendError("images were given to a text-only model")
            merge = int(getattr(self.image_processor, "merge_size", 2))
            expect = sum(int(g.prod()) // (merge * merge) for g in grids)
            if expect != n_pad:
                raise BackendError(
                    f"the ids hold {n_pad} image placeholder tokens but the images need {expect}: "
                    "the images and the ids are out of step"
                )
            batch["pixel_values"] = torch.cat(pv, dim=0)
            batch["image_grid_thw"] = torch.cat(grids, dim=0)
            types = torch.zeros_like(ids)
            types[ids == self.image_token_id] = 1
            if self.video_token_id is not None:
                types[ids == self.video_token_id] = 2
            batch["mm_token_type_ids"] = types * mask
        elif n_pad:
            raise BackendError(f"the ids hold {n_pad} image placeholder tokens but no image inputs were given")
        return batch

    def _grammar_processor(self, constraints: Sequence[Any], n: int, width: int, stops: Stops,
                           prefix: Sequence[Sequence[int]]):
        from medrwr.rollout.constrain import GrammarLogitsProcessor

        if len(constraints) != n:
            raise BackendError(f"constraints has {len(constraints)} entries for {n} states")
        n_vocab = int(self.model.get_output_embeddings().weight.shape[0])
        return GrammarLogitsProcessor(
            self.tokenizer, n_vocab, constraints, width, finished=lambda b: stops.length[b] is not None,
            consumed=prefix,
        )

    def generate(
        self,
        states: Sequence[GenerationState],
        stop: Sequence[str],
        max_new_tokens: int | Sequence[int],
        *,
        watch_token_ids: Sequence[int] = (),
        top_logprobs: int = 0,
        constraints: Sequence[Any] | None = None,
        on_token: Any = None,
    ) -> list[Continuation]:
        """One turn for every row (see the module docstring for stragglers: a call may continue in smaller ones)."""
        if not states:
            return []
        budgets = per_row_budgets(max_new_tokens, len(states))
        if max(budgets) == 0:
            return [Continuation([], [], "length") for _ in states]
        # greedy only: a smaller batch draws other random numbers, and sampled rollouts must not depend on the store
        # (and no caller-supplied logits processors: they may track rows by batch position across a call)
        pausable = (self.kv_cache is not None and self.kv_cache.vl is None and not self.model.training
                    and self.temperature == 0 and not self.logits_processors)
        parts: list[list[Continuation]] = [[] for _ in states]
        rows = list(range(len(states)))
        while rows:
            written = [_ids(parts[i]) for i in rows]  # each row's tokens of this turn so far (earlier segments)
            seg_states = [GenerationState(list(states[i].ids) + w, states[i].mm, states[i].request_id)
                          for i, w in zip(rows, written)]
            outs, paused = self._generate_segment(
                seg_states, stop, [budgets[i] - len(w) for i, w in zip(rows, written)],
                watch_token_ids=watch_token_ids, top_logprobs=top_logprobs,
                constraints=[constraints[i] for i in rows] if constraints is not None else None,
                on_token=(lambda b, t, rows=rows: on_token(rows[b], t)) if on_token is not None else None,
                prefix=written,
                pause_at=len(rows) // PAUSE_FRACTION if pausable and len(rows) >= PAUSE_MIN_ROWS else 0,
            )
            for i, out in zip(rows, outs):
                parts[i].append(out)
            rows = [i for i, p in zip(rows, paused) if p]
        return [_join(p) for p in parts]

    def _generate_segment(
        self,
        states: Sequence[GenerationState],
        stop: Sequence[str],
        budgets: list[int],
        *,
        watch_token_ids: Sequence[int],
        top_logprobs: int,
        constraints: Sequence[Any] | None,
        on_token: Any,
        prefix: Sequence[Sequence[int]],
        pause_at: int,
    ) -> tuple[list[Continuation], list[bool]]:
        """One ``model.generate`` call; returns each row's continuation and whether the row was paused."""
        torch = _torch()
        from transformers import LogitsProcessorList, StoppingCriteriaList

        batch = self._batch(states)
        turn = None
        if self.kv_cache is not None:
            turn = self.kv_cache.prepare([s.ids for s in states], batch, [s.mm for s in states])
        width = batch["input_ids"].shape[1]
        device = self.device
        batch = {k: v.to(device) for k, v in batch.items()}
        if turn is not None:
            batch["past_key_values"] = turn.cache
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
        top_n = max(top_logprobs, self.top_logprobs)
        recorder = Recorder(watch_token_ids, top_n, width)
        stops = Stops(self.tokenizer, stop, width, budgets, self._eos, on_token, prefix=prefix, pause_at=pause_at,
                      pause_min_left=PAUSE_MIN_LEFT)
        processors = [recorder]
        if constraints is not None and any(g is not None for g in constraints):
            processors.append(self._grammar_processor(constraints, len(states), width, stops, prefix))
        processors.extend(self.logits_processors if turn is None else turn.wrap(self.logits_processors))
        if self.seed is not None:  # reproducible, but a fresh stream per call (turns and steps must not repeat)
            torch.manual_seed(self.seed + self.forward_calls)
        with torch.inference_mode():
            seqs = self.model.generate(
                **batch,
                generation_config=self._generation_config(max(budgets)),
                logits_processor=LogitsProcessorList(processors),
                stopping_criteria=StoppingCriteriaList([stops]),
            )
        self.forward_calls += 1
        seqs = seqs.cpu()
        if not torch.equal(seqs[:, :width], batch["input_ids"].cpu()):
            raise BackendError("generate() returned sequences that do not start with the ids fed to it")
        new = seqs[:, width:]
        recorder.finish(new[:, -1] if new.shape[1] else None)
        steps = new.shape[1]
        token_lp = recorder._stack(recorder.token_lp)
        if token_lp is None:
            token_lp = torch.zeros((len(states), 0))
        watch = recorder._stack(recorder.watch_lp)
        tops = (torch.stack(recorder.top_ids, 1).cpu(), recorder._stack(recorder.top_lp)) if recorder.top_ids else None
        out, paused = [], []
        for b in range(len(states)):
            n = stops.length[b]
            reason = stops.reason[b]
            held = stops.paused and n is None
            if held:
                n = steps
            elif n is None:  # stopped by generate itself (max_new_tokens for the batch or its own eos check)
                row = new[b].tolist()
                n = next((i + 1 for i, t in enumerate(row) if t in self._eos), min(steps, budgets[b]))
                reason = "eos" if n and row[n - 1] in self._eos else "length"
            ids = [int(t) for t in new[b, :n].tolist()]
            lps = [float(x) for x in token_lp[b, :n].tolist()]
            if len(lps) != len(ids):
                raise BackendError(f"recorded {len(lps)} log-probabilities for {len(ids)} tokens")
            paused.append(held)
            out.append(
                Continuation(
                    token_ids=ids,
                    logprobs=lps,
                    finish_reason=reason,
                    stop_string=stops.stop_string[b] if reason == "stop" and not held else None,
                    watch_logprobs=watch[b, :n].numpy() if watch is not None else None,
                    top_ids=tops[0][b, :n].numpy() if tops else None,
                    top_logprobs=tops[1][b, :n].numpy() if tops else None,
                )
            )
        if turn is not None:
            self.kv_cache.keep(turn, [s.ids for s in states], [c.token_ids for c in out],
                               last=[b for b, p in enumerate(paused) if p])
        return out, paused


PAUSE_MIN_ROWS = 4
PAUSE_FRACTION = 4
PAUSE_MIN_LEFT = 16
"""A call of >= 4 rows pauses once <= 1/4 of them run, each with > 16 tokens of budget left."""


def _ids(parts: Sequence[Continuation]) -> list[int]:
    return [t for c in parts for t in c.token_ids]


def _join(parts: Sequence[Continuation]) -> Continuation:
    """One row's segments as one continuation (the last segment's finish reason)."""
    if len(parts) == 1:
        return parts[0]
    import numpy as np

    def cat(field: str):
        arrays = [getattr(c, field) for c in parts]
        return None if any(a is None for a in arrays) else np.concatenate(arrays, axis=0)

    last = parts[-1]
    return Continuation(token_ids=_ids(parts), logprobs=[x for c in parts for x in c.logprobs],
                        finish_reason=last.finish_reason, stop_string=last.stop_string,
                        watch_logprobs=cat("watch_logprobs"), top_ids=cat("top_ids"), top_logprobs=cat("top_logprobs"))


# ---------------------------------------------------------------------- loading
# (converting GGUF files once and checking hub ids: medrwr.rollout.backends.policy_cache)


def _is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix == ".gguf"


def _torch_dtype(dtype: str):
    torch = _torch()
    if dtype == "auto":
        return "auto"
    try:
        return getattr(torch, dtype)
    except AttributeError:
        raise BackendError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16") from None


def load_hf_policy(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: str = "auto",
    device: str = "auto",
    progress: bool = True,
    **backend_kwargs: Any,
) -> HFBackend:
    """Load a policy by hub id, local folder or ``.gguf`` file; None = the packaged SmolLM2-135M-Instruct.

    A ``.gguf`` file is converted once into the cache and loaded from there (with progress lines when
    ``progress``); a hub id that cannot be fetched fails at once. Both: :mod:`.policy_cache`.
    Vision-language checkpoints (a config with ``vision_config``) load with ``AutoModelForImageTextToText`` and
    :func:`medrwr.rollout.backends.processing.load_processor`; others with ``AutoModelForCausalLM``.
    """
    _torch()
    from medrwr._imports import require

    transformers = require("transformers", "models", "the transformers policy backend")
    from medrwr.rollout.backends.processing import load_processor, load_tokenizer

    if device == "auto":
        torch = _torch()
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if name_or_path is None:
        from medrwr.assets import smollm2_gguf_path

        name_or_path = smollm2_gguf_path()
    path = Path(name_or_path).expanduser()
    converted = _is_gguf(path)
    if converted:
        if not cache_writable(path):  # read-only cache: parse the GGUF file (slow, every run)
            model, tok = load_gguf_directly(path)
            return HFBackend(use_grouped_sdpa(model.to(device).eval()), tok, **backend_kwargs)
        source = str(convert_gguf_policy(path, progress=progress))
    elif path.exists():
        source = str(path)
    elif str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).endswith(".gguf"):
        raise BackendError(f"no model at {path}: pass a hub id (e.g. Qwen/Qwen2.5-VL-7B-Instruct) or a local folder")
    else:
        source = str(name_or_path)
        check_hub_id(source)
    try:
        config = transformers.AutoConfig.from_pretrained(source)
    except OSError as exc:
        reason = str(exc).strip().rstrip(".")
        raise BackendError(
            f"cannot load the model config of {str(name_or_path)!r}: {reason}. Pass a hub id reachable from this "
            "machine or a local checkpoint folder."
        ) from None
    torch_dtype = _torch_dtype(dtype)
    with quiet_transformers():
        if hasattr(config, "vision_config"):
            auto = getattr(transformers, "AutoModelForImageTextToText", None) or transformers.AutoModelForVision2Seq
            model = auto.from_pretrained(source, dtype=torch_dtype)
            processor = load_processor(source)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
            processor = load_tokenizer(source)
    if converted and device == "cpu":
        into_own_memory(model)  # exactly the GGUF-loaded model's log-probs (moving to a GPU copies anyway)
    return HFBackend(use_grouped_sdpa(model.to(device).eval()), processor, **backend_kwargs)
