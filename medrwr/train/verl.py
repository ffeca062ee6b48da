"""The reasoning-with-retrieval loop as a verl 0.9.1 agent loop (the ``verl`` extra; docs/scaling.md).

verl (Ray; FSDP/Megatron actors; async vLLM/SGLang rollout servers) picks an agent loop per dataset row by its
``agent_name`` column. Ours, :class:`MedRwRAgentLoop` (registered as ``medrwr_agent``), runs *our engine*: the
engine gets a :class:`ServerClientBackend`, a :class:`~medrwr.rollout.backends.base.PolicyBackend` whose
``generate`` asks verl's server client (``LLMServerClient.generate(request_id, prompt_ids=, sampling_params=,
image_data=)`` → ``TokenOutput(token_ids, log_probs)``) for each turn, with ``stop=["</query>", "</answer>"]``
and the stop string kept. Transcript, parsing, retrieve-block formatting (mask 0), budgets, traces and the
end token after ``</answer>`` are the TRL path's own code (:class:`medrwr.train.grpo.TrainRollout` around
:class:`~medrwr.rollout.engine.RolloutEngine`); there is no second loop. Retrieval goes through
:func:`medrwr.retrieval.open.open_retriever`: with ``retrieval.url`` every rollout worker shares one index
service (``medrwr serve retrieval``, or the Ray Serve shards).

How it runs: verl awaits ``run`` on its event loop; the engine (synchronous) runs in a worker thread, and the
backend hands each generate call back to the event loop (``asyncio.run_coroutine_threadsafe``), so many
rollouts of a worker interleave while one waits for the server or the retriever.

What verl gets (``AgentLoopOutput``): ``prompt_ids`` (our chat-template ids, as TRL), ``response_ids``
(model and retrieved tokens interleaved), ``response_mask`` (1 model, 0 retrieved), ``response_logprobs`` (the
server's; 0.0 on inserted tokens and on the appended end token), ``multi_modal_data={"images": [...]}``,
``num_turns`` and ``extra_fields`` with the trace (read by :mod:`medrwr.train.verl_reward`).

Our config comes from the verl config's ``medrwr`` section: ``medrwr.config`` (a YAML file, as ``medrwr train
--config``) and ``medrwr.overrides`` (``--set`` strings). Sampling settings are verl's
(``actor_rollout_ref.rollout.temperature`` ...); verl's vLLM server returns only the sampled token's log-prob,
so a trace's ``option_probs`` hold the chosen letter only (the confidence itself is exact).

verl is imported on first use of :class:`MedRwRAgentLoop` (module ``__getattr__``), so importing this module
costs nothing; verl's ``_target_`` lookup and ``@register`` both go through that attribute.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import Sequence
from typing import Any

from medrwr import protocol
from medrwr.errors import BackendError, ConfigError
from medrwr.rollout.backends.base import (
    Continuation,
    FinishReason,
    GenerationState,
    find_stop,
    per_row_budgets,
)
from medrwr.rollout.backends.processing import RawImagePrompts
from medrwr.train.verl_data import AGENT_NAME
from medrwr.train.verl_reward import IMAGES_KEY, TRACE_KEY

logger = logging.getLogger(__name__)

ROLLOUT_THREADS = 256
"""Rollouts one verl agent-loop worker process runs at once (threads of :func:`_executor`)."""

__all__ = ["AGENT_NAME", "MedRwRAgentLoop", "ServerClientBackend", "chat_messages", "worst_case_response_length"]  # noqa: F822


class ServerClientBackend(RawImagePrompts):
    """A :class:`~medrwr.rollout.backends.base.PolicyBackend` over verl's async server client.

    ``generate`` is called from the engine's worker thread and runs the requests on ``loop`` (one per row,
    concurrently). ``sampling_params`` are verl's (temperature, top_p, top_k, ...); each turn adds the stop
    strings (kept in the output), the token budget and ``logprobs``. ``engine`` is verl's rollout name: vLLM
    keeps a stop string with ``include_stop_str_in_output``, SGLang with ``no_stop_trim``.
    """

    supports_constraints = False

    def __init__(self, server: Any, processor: Any, loop: asyncio.AbstractEventLoop, sampling_params: dict[str, Any],
                 *, engine: str = "vllm", eos_token_ids: Sequence[int] = ()):
        self.server = server
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", None) or processor
        self.supports_images = getattr(processor, "image_processor", None) is not None
        self.loop = loop
        self.sampling_params = {k: v for k, v in dict(sampling_params).items() if k not in ("logprobs", "max_tokens")}
        self.engine = engine
        eos = {int(t) for t in eos_token_ids}
        if self.tokenizer.eos_token_id is not None:
            eos.add(int(self.tokenizer.eos_token_id))
        self._eos = eos
        self.calls = 0
        self._session = uuid.uuid4().hex  # one per rollout: verl routes a request id to one server (prefix cache)

    def _params(self, stop: Sequence[str], budget: int) -> dict[str, Any]:
        params = {**self.sampling_params, "stop": list(stop), "max_tokens": budget, "logprobs": True}
        params["no_stop_trim" if self.engine == "sglang" else "include_stop_str_in_output"] = True
        return params

    async def _one(self, state: GenerationState, stop: Sequence[str], budget: int) -> Continuation:
        if budget <= 0:
            return Continuation([], [], "length")
        images = list(state.mm.data.get("image", [])) if state.mm else []
        out = await self.server.generate(
            request_id=f"{self._session}-{state.request_id}", prompt_ids=list(state.ids),
            sampling_params=self._params(stop, budget), image_data=images or None,
        )
        ids = [int(t) for t in out.token_ids][:budget]
        lps = [float(x) for x in (out.log_probs or [])][: len(ids)]
        if len(lps) != len(ids):
            raise BackendError(f"the rollout server returned {len(lps)} log-probs for {len(ids)} tokens; "
                               "it must honour sampling_params['logprobs']")
        reason: FinishReason = "length"
        hit = find_stop(self.tokenizer.decode(ids), stop) if ids else None
        if hit is not None:
            reason = "stop"
        elif ids and ids[-1] in self._eos:
            reason = "eos"
        elif len(ids) < budget and getattr(out, "stop_reason", None) == "aborted":
            raise BackendError("the rollout server aborted the request (verl paused generation)")
        return Continuation(ids, lps, reason, hit[1] if hit else None)

    def generate(self, states: Sequence[GenerationState], stop: Sequence[str], max_new_tokens: int | Sequence[int],
                 *, watch_token_ids: Sequence[int] = (), top_logprobs: int = 0,
                 constraints: Sequence[Any] | None = None) -> list[Continuation]:
        if constraints is not None and any(c is not None for c in constraints):
            raise BackendError("verl rollouts are never constrained; set rollout.constrain: none")
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:  # waiting here for a coroutine of this very loop would never return
            raise BackendError("ServerClientBackend.generate runs in a worker thread, not on an event loop")
        budgets = per_row_budgets(max_new_tokens, len(states))
        self.calls += 1

        async def all_rows() -> list[Continuation]:
            return list(await asyncio.gather(*(self._one(s, stop, b) for s, b in zip(states, budgets))))

        return asyncio.run_coroutine_threadsafe(all_rows(), self.loop).result()


def chat_messages(raw_prompt: Any) -> list[dict[str, Any]]:
    """verl's ``raw_prompt`` as the chat messages TRL hands our rollout: image parts ``{"type": "image",
    "image": RGB PIL}`` (verl adds ``bytes``/``path`` keys), text parts ``{"type": "text", "text": ...}``."""
    from medrwr.rollout.request import load_image

    out = []
    for m in list(raw_prompt):
        content = m["content"]
        if not isinstance(content, str):
            parts = []
            for p in list(content):
                if p.get("type") == "image":
                    src = next((p[k] for k in ("image", "bytes", "path") if p.get(k) is not None), None)
                    if src is None:
                        raise BackendError("an image part without 'image', 'bytes' or 'path' in a verl prompt")
                    parts.append({"type": "image", "image": load_image(src)})
                elif p.get("type") == "text":
                    parts.append({"type": "text", "text": str(p.get("text", ""))})
                else:
                    raise BackendError(f"a {p.get('type')!r} part in a prompt: our loop takes text and images only")
            content = parts
        out.append({"role": str(m["role"]), "content": content})
    return out


def worst_case_response_length(rollout: Any) -> int:
    """Most response tokens a rollout can hold: its model tokens, ``max_rounds`` + 1 inserted blocks (the last a
    budget notice), each with the newline put before it, and the end token (``rollout``: our
    :class:`~medrwr.config.RolloutConfig`; one query per turn, as generation pauses at ``</query>``)."""
    return rollout.max_total_new_tokens + (rollout.max_rounds + 1) * (rollout.max_inserted_tokens + 1) + 1


@functools.lru_cache(maxsize=1)
def _executor() -> Any:
    """The threads our engines run in: each mostly waits on the server or the retriever, so a worker process
    keeps up to ``ROLLOUT_THREADS`` rollouts in flight (asyncio's default pool would cap it at ~32)."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=ROLLOUT_THREADS, thread_name_prefix="medrwr-rollout")


@functools.lru_cache(maxsize=4)
def _resources(config: str | None, overrides: tuple[str, ...]) -> tuple[Any, Any]:
    """``(Config, retriever)`` of a worker process: one HTTP client (or index) shared by its rollouts."""
    from medrwr.config import load_config

    cfg = load_config(config, list(overrides))
    if cfg.rollout.constrain == "protocol":
        raise ConfigError("rollout.constrain must be none for training (the policy learns the protocol itself)")
    cfg.rollout.constrain = "none"  # "auto" would pick the demo policy's grammar: verl's model.name is not ours
    if cfg.cdir.enabled:
        raise ConfigError("cdir.enabled: CDIR inserts images after the answer, which a training sequence cannot "
                          "hold; turn it off for training")
    retriever = None
    if cfg.rollout.max_rounds > 0:
        from medrwr.retrieval.open import open_retriever

        retriever = open_retriever(cfg)
    return cfg, retriever


def medrwr_settings(trainer_config: Any) -> tuple[str | None, tuple[str, ...]]:
    """``(medrwr.config, medrwr.overrides)`` from verl's trainer config (absent section: our defaults)."""
    section = trainer_config.get("medrwr", None) or {}
    config = section.get("config", None)
    overrides = tuple(str(o) for o in (section.get("overrides", None) or ()))
    return (str(config) if config else None), overrides


async def run_loop(agent: Any, sampling_params: dict[str, Any], raw_prompt: Any) -> Any:
    """One verl rollout through our engine (the body of :meth:`MedRwRAgentLoop.run`)."""
    from verl.experimental.agent_loop.agent_loop import AgentLoopOutput

    from medrwr.rollout.engine import RolloutEngine, engine_from_config
    from medrwr.rollout.request import images_in
    from medrwr.train.grpo import TrainRollout

    cfg, retriever = agent.medrwr_config, agent.medrwr_retriever
    loop = asyncio.get_running_loop()
    processor = agent.processor if agent.processor is not None else agent.tokenizer
    backend = ServerClientBackend(agent.server_manager, processor, loop, sampling_params,
                                  engine=str(agent.rollout_config.get("name", "vllm")))
    if retriever is not None:
        engine = engine_from_config(cfg, backend=backend, retriever=retriever)
    else:
        engine = RolloutEngine(backend, None, cfg.rollout, k=cfg.retrieval.k, constrain="none")
    tok = backend.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else tok.eos_token_id
    messages = chat_messages(raw_prompt)
    images = images_in(messages)
    out = await loop.run_in_executor(_executor(), TrainRollout(engine, end), [messages])
    trace = out["traces"][0]
    prompt_ids, response_ids, mask = out["prompt_ids"][0], out["completion_ids"][0], out["env_mask"][0]
    if len(prompt_ids) > agent.prompt_length:
        raise ConfigError(f"a prompt has {len(prompt_ids)} tokens, more than data.max_prompt_length="
                          f"{agent.prompt_length}; raise it (images count as their placeholder tokens)")
    n = agent.response_length
    if len(response_ids) > n:  # the config check makes this unreachable unless budgets were changed at run time
        logger.warning("a rollout of %d response tokens was cut to data.max_response_length=%d", len(response_ids), n)
    extra: dict[str, Any] = {TRACE_KEY: trace.to_dict(), "turn_scores": [], "tool_rewards": []}
    if images and cfg.rewards.query_weight and cfg.rewards.image_encoder:
        extra[IMAGES_KEY] = images
    inserted = sum(1 for s in trace.spans if s.kind == protocol.RETRIEVE and not s.by_model)
    return AgentLoopOutput(
        prompt_ids=list(prompt_ids),
        response_ids=list(response_ids)[:n],
        response_mask=list(mask)[:n],
        response_logprobs=[0.0 if lp is None else float(lp) for lp in out["logprobs"][0]][:n],
        multi_modal_data={"images": images} if images else {},
        num_turns=1 + int(trace.metadata.get("turns", 0)) + inserted,
        metrics={"generate_sequences": engine.stats.generate_s, "tool_calls": engine.stats.retrieval_s},
        extra_fields=extra,
    )


@functools.lru_cache(maxsize=1)
def _agent_loop_class() -> type:
    from medrwr._imports import require

    require("verl", "verl", "the verl agent loop")
    from verl.experimental.agent_loop.agent_loop import AgentLoopBase, register

    class MedRwRAgentLoop(AgentLoopBase):
        """verl's agent loop running our reasoning-with-retrieval engine (module docstring)."""

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.prompt_length = int(self.rollout_config.prompt_length)
            self.response_length = int(self.rollout_config.response_length)
            self.medrwr_config, self.medrwr_retriever = _resources(*medrwr_settings(self.config))
            need = worst_case_response_length(self.medrwr_config.rollout)
            if self.response_length < need:
                raise ConfigError(
                    f"data.max_response_length={self.response_length} is below the rollout's worst case {need} "
                    "(rollout.max_total_new_tokens + (max_rounds + 1) * (max_inserted_tokens + 1) + 1); raise it or "
                    "lower those budgets"
                )

        async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> Any:
            return await run_loop(self, sampling_params, kwargs["raw_prompt"])

    MedRwRAgentLoop.__module__ = __name__
    MedRwRAgentLoop.__qualname__ = "MedRwRAgentLoop"
    return register(AGENT_NAME)(MedRwRAgentLoop)


def __getattr__(name: str) -> Any:
    if name == "MedRwRAgentLoop":
        return _agent_loop_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
