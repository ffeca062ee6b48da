"""One config system for every command: YAML files mapped onto typed dataclasses, plus ``--set`` overrides.

Precedence (lowest first): the dataclass defaults, the YAML file, ``--set section.key=value`` flags.
For an index's search settings (mode, rrf_k, weights, fusion_depth, ...) the index manifest's stored
``build_config`` sits above the defaults: manifest < YAML < ``--set`` (:meth:`RetrievalConfig.layered_on`).
Unknown keys and wrong types are errors naming the key and the file. Each section validates its own
values in ``__post_init__`` and says how to fix a bad one.

Long module: it is the one schema users read: a dataclass per YAML section (each checking its own values)
plus the loader, kept together so every key, default and check is found in one place.

>>> cfg = load_config(None, ["retrieval.k=5", "rollout.max_rounds=2"])
>>> (cfg.retrieval.k, cfg.rollout.max_rounds)
(5, 2)
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import (
    Any,
    Literal,
    Sequence,
    TypeVar,
    Union,
    get_args,
    get_origin,
    get_type_hints,
)

from medrwr.errors import ConfigError

DEFAULT_RETRIEVAL_PORT = 8321
_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
DEFAULT_API_PORT = 8322


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


@dataclass
class RetrievalConfig:
    """Knowledge-base retrieval (``medrwr index``, ``medrwr retrieve``, the rollout's retriever)."""

    index: str | None = None
    """Index directory; None means the shipped default knowledge base (built on first use)."""
    url: str | None = None
    """Use a running retrieval server instead of an in-process index (e.g. http://127.0.0.1:8321)."""
    mode: Literal["bm25", "dense", "hybrid"] = "hybrid"
    k: int = 3
    encoder: str = "default"
    """Text encoder: ``default`` (packaged MiniLM), a hub id or a local sentence-transformers folder."""
    faiss_index: Literal["flat", "ivf", "hnsw"] = "flat"
    ivf_nlist: int = 1024
    hnsw_m: int = 32
    rrf_k: int = 60
    bm25_weight: float = 1.0
    dense_weight: float = 1.0
    name_weight: float = 1.0
    """Weight of the exact-name ranking in hybrid fusion (indexes with a name table, e.g. the default KB)."""
    name_bm25_weight: float = 0.0
    """Weight of the BM25-over-names ranking in hybrid fusion (indexes with a name table)."""
    clinical_weight: float = 0.0
    """Weight of the BM25 ranking over documents' clinical text alone (``metadata["clinical"]``: the default KB's
    clinical presentations) in hybrid fusion."""
    name_dense_weight: float = 0.0
    """Weight of the ranking by closest embedded name in hybrid fusion (indexes with a name table and a dense
    encoder)."""
    stemmer: str | None = "english"
    stopwords: str | None = "en"
    batch_size: int = 64
    chunk_words: int = 0
    """Chunk long passages into this many words (0 keeps passages whole)."""
    chunk_overlap: int = 0
    dense: bool = True
    """Build embeddings + FAISS (False: a BM25-only index, mode bm25 only)."""
    device: str = "auto"
    """Encoder device: auto, cpu, cuda, mps."""
    query_prefix: str | None = None
    """Prepended to queries before encoding (e5: 'query: '); None = the encoder's default."""
    passage_prefix: str | None = None
    max_seq_length: int | None = None
    bm25_k1: float = 1.5
    bm25_b: float = 0.75
    bm25_method: Literal["lucene", "robertson", "atire", "bm25l", "bm25+"] = "lucene"
    ivf_nprobe: int = 16
    hnsw_ef_search: int = 64
    fusion_depth: int = 50
    """Candidates taken from each retriever before RRF fusion and de-duplication."""
    n_threads: int = 0
    """FAISS OpenMP threads for search (0 = one: batches go through BLAS; -1 = all CPUs)."""
    explicit: tuple[str, ...] | None = field(default=None, repr=False, compare=False, metadata={"loader": True})
    """The keys the user set (YAML or ``--set``), recorded by :func:`load_config`; not a setting itself.
    None (built in code): the keys whose value differs from the default count as set."""

    def __post_init__(self) -> None:
        _check(self.k >= 1, f"retrieval.k must be >= 1, got {self.k}")
        _check(self.fusion_depth >= 1, f"retrieval.fusion_depth must be >= 1, got {self.fusion_depth}")
        _check(self.ivf_nprobe >= 1 and self.hnsw_ef_search >= 1, "retrieval.ivf_nprobe and hnsw_ef_search must be >= 1")
        _check(self.bm25_k1 >= 0 and 0 <= self.bm25_b <= 1, "retrieval.bm25_k1 must be >= 0 and bm25_b in [0, 1]")
        _check(self.rrf_k >= 1, f"retrieval.rrf_k must be >= 1, got {self.rrf_k}")
        _check(self.batch_size >= 1, f"retrieval.batch_size must be >= 1, got {self.batch_size}")
        _check(self.chunk_words >= 0, "retrieval.chunk_words must be >= 0 (0 keeps passages whole)")
        _check(
            0 <= self.chunk_overlap < max(self.chunk_words, 1),
            f"retrieval.chunk_overlap must be in [0, chunk_words), got {self.chunk_overlap}",
        )
        _check(min(self.bm25_weight, self.dense_weight, self.name_weight, self.name_bm25_weight,
                   self.clinical_weight, self.name_dense_weight) >= 0,
               "retrieval weights must be >= 0")

    def settings(self) -> dict[str, Any]:
        """Every setting as a JSON-able dict (what an index manifest stores as ``build_config``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata.get("loader")}

    def explicit_keys(self) -> frozenset[str]:
        """The settings the user chose (see :attr:`explicit`)."""
        if self.explicit is not None:
            return frozenset(self.explicit)
        default = RetrievalConfig()
        return frozenset(k for k, v in self.settings().items() if getattr(default, k) != v)

    @classmethod
    def from_stored(cls, stored: dict[str, Any] | None) -> RetrievalConfig:
        """Settings saved in an index manifest; keys this version does not know are ignored."""
        names = {f.name for f in dataclasses.fields(cls) if not f.metadata.get("loader")}
        try:
            return cls(**{k: v for k, v in (stored or {}).items() if k in names})
        except (TypeError, ValueError):
            logging.getLogger(__name__).warning(
                "index build_config is not a valid RetrievalConfig; using defaults for search settings"
            )
            return cls()

    def layered_on(self, stored: dict[str, Any] | None) -> RetrievalConfig:
        """The one precedence rule for search settings: ``stored`` (an index manifest's build_config)
        < this config's explicitly set keys (YAML < ``--set``, merged by :func:`load_config`)."""
        base = RetrievalConfig.from_stored(stored).settings()
        mine = self.settings()
        chosen = self.explicit_keys()
        base.update({k: v for k, v in mine.items() if k in chosen})
        for key in ("index", "url"):  # where to search, never a stored setting
            base[key] = mine[key]
        return RetrievalConfig(**base, explicit=tuple(sorted(chosen)))


@dataclass
class ServerConfig:
    """The retrieval service (``medrwr serve retrieval``) and the API (``medrwr serve api``)."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_RETRIEVAL_PORT
    api_port: int = DEFAULT_API_PORT
    api_key_env: str | None = None
    """Name of an environment variable holding a bearer token; None disables auth."""
    max_batch_size: int = 64
    max_wait_ms: float = 5.0
    max_queue: int = 1024
    max_queries_per_request: int = 256
    max_query_chars: int = 4096
    max_k: int = 100
    max_body_bytes: int = 8 * 1024 * 1024
    max_images_per_request: int = 16
    graceful_shutdown_s: float = 30.0
    """How long a stopping server waits for in-flight requests before closing their connections."""
    # the chat API only (medrwr serve api): limits, scheduler queue/batch/window, image URL policy (docs/serving.md)
    max_messages: int = 64
    max_message_chars: int = 20_000
    max_input_image_pixels: int = 16_777_216
    api_max_queue: int = 64
    api_max_batch: int = 32
    api_batch_wait_ms: float = 20.0
    allow_file_root: str | None = None
    allow_remote_images: bool = False

    def __post_init__(self) -> None:
        _check(0 < self.port < 65536, f"server.port must be in 1..65535, got {self.port}")
        _check(self.max_messages >= 1 and self.api_max_queue >= 1 and self.api_max_batch >= 1,
               "server.max_messages, server.api_max_queue and server.api_max_batch must be >= 1")
        _check(self.api_batch_wait_ms >= 0, "server.api_batch_wait_ms must be >= 0")
        _check(0 < self.api_port < 65536, f"server.api_port must be in 1..65535, got {self.api_port}")
        _check(self.max_batch_size >= 1, "server.max_batch_size must be >= 1")
        _check(self.max_wait_ms >= 0, "server.max_wait_ms must be >= 0")
        _check(self.max_queue >= 1, "server.max_queue must be >= 1")
        _check(self.max_k >= 1, "server.max_k must be >= 1")


@dataclass
class RolloutConfig:
    """The reason-query-retrieve loop (docs/method.md §1)."""

    max_rounds: int = 3
    """Maximum retrievals per rollout."""
    queries_per_turn: int = 0
    """Queries retrieved per turn; 0 = all of them (the reference took only the first: set 1)."""
    max_new_tokens_per_turn: int = 1024
    max_total_new_tokens: int = 4096
    max_inserted_tokens: int = 512
    """Budget of one retrieve block; documents are truncated, never the model's text."""
    temperature: float = 0.0
    """0 = greedy: the default for ``ask``, evaluation and serving. Training sets 1.0 (docs/method.md §3, configs/stage*.yaml)."""
    top_p: float = 1.0
    max_image_pixels: int = 262_144
    retrieval_timeout_s: float = 60.0
    """A retriever call slower than this is recorded as failed and the rollout continues (0 = no limit)."""
    seed: int | None = None
    """Sampling seed for reproducible rollouts (None = not seeded)."""
    constrain: Literal["auto", "none", "protocol"] = "auto"
    """Grammar-constrained decoding (``medrwr.rollout.constrain``): ``protocol`` lets the model write only text that
    keeps each turn inside the protocol grammar (answer letters limited to the question's options); ``none`` is
    free decoding (training); ``auto`` = ``protocol`` for the packaged demo policy (``model.name: null``, an
    untuned SmolLM2 that otherwise answers in prose) and ``none`` for every other model
    (``medrwr.rollout.constrain.resolve_constrain``)."""
    constrain_max_think_tokens: int = 96
    """Constrained decoding: longest think block (tokens); the model may close it earlier. 96: the packaged
    SmolLM2 then searches on half of benchmarks/rollout.py's 50 questions (48: 18/50, 96: 25/50, 256: 22/50)."""
    constrain_max_query_tokens: int = 48
    """Constrained decoding: longest query block (tokens)."""
    kv_cache: Literal["auto", "on", "off"] = "auto"
    """Transformers backend: keep each row's keys/values across turns instead of re-reading the transcript
    (``medrwr.rollout.backends.kv_cache``, docs/kv-cache.md). ``auto`` = on for text-only llama/qwen2/qwen3/mistral
    models and Qwen2.5-VL (M-RoPE positions, images, CDIR), off for other vision-language models; ``on`` fails
    where it is not exact; ``off`` = the uncached path."""

    def __post_init__(self) -> None:
        _check(self.kv_cache in ("auto", "on", "off"),
               f"rollout.kv_cache must be auto, on or off, got {self.kv_cache!r}")
        _check(self.constrain_max_think_tokens >= 1, "rollout.constrain_max_think_tokens must be >= 1")
        _check(self.constrain_max_query_tokens >= 1, "rollout.constrain_max_query_tokens must be >= 1")
        _check(self.retrieval_timeout_s >= 0, "rollout.retrieval_timeout_s must be >= 0 (0 = no limit)")
        _check(self.max_rounds >= 0, f"rollout.max_rounds must be >= 0, got {self.max_rounds}")
        _check(self.queries_per_turn >= 0, "rollout.queries_per_turn must be >= 0 (0 = all)")
        _check(self.max_new_tokens_per_turn >= 1, "rollout.max_new_tokens_per_turn must be >= 1")
        _check(
            self.max_total_new_tokens >= self.max_new_tokens_per_turn,
            "rollout.max_total_new_tokens must be >= rollout.max_new_tokens_per_turn",
        )
        _check(self.max_inserted_tokens >= 16, "rollout.max_inserted_tokens must be >= 16")
        _check(self.temperature >= 0, "rollout.temperature must be >= 0 (0 = greedy)")


@dataclass
class CDIRConfig:
    """Confidence-driven image re-retrieval (docs/method.md §5)."""

    enabled: bool = False
    threshold: float = 0.8
    """Paper: 0.8. The reference code used 0.9."""
    image_index: str | None = None
    k: int = 1

    def __post_init__(self) -> None:
        _check(0.0 <= self.threshold <= 1.0, f"cdir.threshold must be in [0, 1], got {self.threshold}")
        _check(self.k >= 1, "cdir.k must be >= 1")


@dataclass
class RewardConfig:
    """Reward weights and options (docs/method.md, "Rewards"): total = format + 5 accuracy + 0.4 query + 5 conf.

    Each ``*_weight`` field weights the registry's rewards that name it (``medrwr.rewards.registry``);
    a test keeps the two in step.
    """

    format_weight: float = 1.0
    accuracy_weight: float = 5.0
    query_weight: float = 0.4
    """Weights both query-semantic terms, text and image."""
    confidence_weight: float = 5.0
    length_weight: float = 0.0
    """The reference code's length penalty; off by default."""
    compat: bool = False
    """Reproduce the reference code's format reward and first-pass confidence gain."""
    image_encoder: str | None = None
    """CLIP-family encoder for the image–query reward (hub id or path); None disables that term."""
    entity_extractor: Literal["lexicon", "scispacy"] = "lexicon"
    confidence_batch_size: int = 8
    """Sequences per forward pass of the confidence-gain reward's extra ("without retrieval") pass."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name.endswith("_weight"):
                w = getattr(self, f.name)
                _check(
                    isinstance(w, (int, float)) and math.isfinite(w),
                    f"rewards.{f.name} must be a finite number, got {w!r}",
                )
        _check(
            self.confidence_batch_size >= 1,
            f"rewards.confidence_batch_size must be >= 1, got {self.confidence_batch_size}",
        )


@dataclass
class ModelConfig:
    """The policy model."""

    name: str | None = None
    """Hub id or local path; None = the packaged SmolLM2-135M-Instruct (text only)."""
    backend: Literal["hf", "vllm"] = "hf"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    threads: int | None = None
    """torch intra-op CPU threads, set with ``torch.set_num_threads`` when the backend loads; None = auto
    (``medrwr.rollout.backends.registry.resolve_threads``: 1 on <= 2 cores, else half the cores, at most 8)."""

    def __post_init__(self) -> None:
        _check(self.threads is None or self.threads >= 1, f"model.threads must be >= 1 or null (auto), got {self.threads}")


@dataclass
class TrainConfig:
    """GRPO stages 1-2 and the SFT cold start (stage 0); paper values by default (docs/method.md §3, docs/training.md)."""

    stage: int = 1
    output_dir: str = "runs/medrwr"
    dataset: str | None = None  # MedQA/MedMCQA/MCQ JSONL, JSON or parquet (medrwr.train.data)
    limit: int | None = None  # first N samples only
    num_generations: int = 8
    per_device_batch_size: int = 8  # completions per device per step (TRL's unit): 8 prompts x 8 = 64 in the paper
    learning_rate: float = 1e-6
    warmup_ratio: float = 0.05
    beta: float = 1e-3
    epsilon: float = 0.2
    num_train_epochs: float = 1.0
    max_steps: int = -1
    seed: int = 42
    bf16: bool = False
    lora: int = 0  # LoRA rank (peft); 0 = full fine-tuning
    rewards: list[str] = field(default_factory=lambda: ["total"])  # registry names (medrwr.rewards.registry)
    trl: dict[str, Any] = field(default_factory=dict)  # any other GRPOConfig/SFTConfig field, checked by name
    logprob_head: Literal["auto", "fused", "plain"] = "auto"  # training log-probs: TRL's fused head or a plain log-softmax over completion positions (auto: plain on CPU)

    def __post_init__(self) -> None:
        _check(self.stage in (0, 1, 2), f"train.stage must be 0 (SFT), 1 or 2, got {self.stage}")
        _check(self.num_generations >= 2, "train.num_generations must be >= 2 (GRPO needs a group)")
        _check(self.lora >= 0 and (self.limit is None or self.limit >= 1), "train.lora must be >= 0, train.limit >= 1")


EVAL_MODES = ("direct", "rag", "rwr", "rwr_cdir", "all")


@dataclass
class EvalConfig:
    """``medrwr eval`` (docs/evaluation.md, which explains every key); CLI flags override these keys."""

    benchmarks: list[str] = field(default_factory=list)
    data_dir: str | None = None
    modes: list[str] = field(default_factory=lambda: ["rwr"])  # direct, rag, rwr, rwr_cdir or all
    output_dir: str = "runs/eval"
    limit: int | None = None
    batch_size: int = 32  # rows running at once (continuous batching; rwr_cdir: items per engine call)
    preset: str = "standard"
    split: str | None = None
    languages: list[str] | None = None  # None = every language in the file
    keep_tokens: bool = False  # keep the traces' token arrays in results.jsonl
    base_url: str | None = None  # endpoint of an openai:MODEL policy; its key is read from api_key_env
    api_key_env: str = "OPENAI_API_KEY"
    continuation: Literal["turns", "prefill"] = "turns"
    concurrency: int = 8
    request_timeout_s: float = 120.0
    judge_url: str | None = None  # optional LLM judge for open answers (OpenAI-compatible base URL) ...
    judge_model: str | None = None  # ... and the model it serves; verdicts cached under the medrwr cache

    def __post_init__(self) -> None:
        _check((self.judge_url is None) == (self.judge_model is None),
               "eval.judge_url and eval.judge_model go together: set both (--judge-url, --judge-model) or neither")
        bad = [m for m in self.modes if m not in EVAL_MODES]
        _check(not bad, f"eval.modes: unknown {bad}; choose from {', '.join(EVAL_MODES)}")
        _check((self.limit is None or self.limit >= 1) and self.batch_size >= 1 and self.concurrency >= 1
               and self.request_timeout_s > 0, "eval.limit, batch_size, concurrency must be >= 1, timeout > 0")


@dataclass
class DataConfig:
    """``medrwr data synth`` and ``medrwr kb from-explanations`` (docs/data-pipelines.md explains every key)."""

    n: int = 6500  # questions wanted (the paper's stage-2 set had about 6,500)
    image_encoder: str = "pixel-stats"  # select: any medrwr image encoder spec (hf:..., open_clip:...)
    clusters: int = 0  # select: k-means clusters; 0 = about sqrt(pairs), at most the pairs selected
    oversample: float = 2.0  # select n * oversample pairs: write and stratify drop some
    seed: int = 0
    concurrency: int = 8  # write: requests in flight
    attempts: int = 3  # write: tries per caption until the reply validates
    http_retries: int = 4  # write: retries per request on timeouts, 429 and 5xx
    backoff_s: float = 1.0  # write: first retry wait (doubles; a Retry-After header wins, capped at 60 s)
    timeout_s: float = 60.0
    temperature: float = 0.7
    max_tokens: int = 1024
    price_in_per_mtok: float = 0.0  # write: prices for the progress bar's cost estimate (0 = tokens only)
    price_out_per_mtok: float = 0.0
    samples: int = 8  # stratify: policy answers per question (direct mode, no retrieval)
    stratify_temperature: float = 1.0  # stratify: sampling temperature of the policy (0 would answer alike n times)
    band: list[float] = field(default_factory=lambda: [0.0, 1.0])
    """stratify keeps questions whose accuracy over the samples is strictly inside (lo, hi): the paper keeps
    those the model neither always nor never answers right. [-1, 2] keeps everything."""
    kb_min_words: int = 5
    kb_max_words: int = 80
    kb_dedup: Literal["auto", "minhash", "embedding"] = "auto"  # auto: minhash when datasketch is installed
    kb_dedup_threshold: float = 0.8  # kb: MinHash Jaccard from which a statement is a near-duplicate
    kb_dedup_cosine: float = 0.95  # kb, embedding dedup: cosine (retrieval.encoder) from which it is one
    kb_num_perm: int = 128

    def __post_init__(self) -> None:
        _check(self.n >= 1 and self.samples >= 1 and self.concurrency >= 1 and self.attempts >= 1,
               "data.n, data.samples, data.concurrency and data.attempts must be >= 1")
        _check(self.oversample >= 1.0 and self.clusters >= 0 and self.http_retries >= 0 and self.timeout_s > 0,
               "data.oversample must be >= 1, data.clusters and data.http_retries >= 0, data.timeout_s > 0")
        _check(len(self.band) == 2 and self.band[0] < self.band[1],
               f"data.band must be [lo, hi] with lo < hi (e.g. [0.0, 1.0]), got {self.band}")
        _check(0.0 < self.kb_dedup_threshold <= 1.0 and 1 <= self.kb_min_words <= self.kb_max_words,
               "data.kb_dedup_threshold must be in (0, 1]; 1 <= data.kb_min_words <= data.kb_max_words")


@dataclass
class Config:
    """Every section. A YAML file may set any subset; unknown sections are errors."""

    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    cdir: CDIRConfig = field(default_factory=CDIRConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert the few lossless cases (int -> float)."""
    origin = get_origin(tp)
    if origin is Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType)):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError:
                continue
        raise ConfigError(f"{key} in {source}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key} in {source}: must be one of {list(choices)}, got {value!r}")
        return value
    if origin in (list, Sequence, typing.Sequence) or tp is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} in {source}: expected a list, got {value!r}")
        (item_tp,) = get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} in {source}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} in {source}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, source=source, prefix=key)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} in {source}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} in {source}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string; it is a number to every user
        raise ConfigError(f"{key} in {source}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} in {source}: expected a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], source: str = "<dict>", prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types by name."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    loader_only = {f.name for f in dataclasses.fields(cls) if f.metadata.get("loader")}  # type: ignore[arg-type]
    names -= loader_only
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(
                f"unknown key '{full}' in {source}; valid keys here: {', '.join(sorted(names))}"
            )
        kwargs[key] = _coerce(value, hints[key], full, source)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (in {source})") from None


def _parse_scalar(text: str) -> Any:
    """Parse an override value with YAML rules (``5`` -> int, ``true`` -> bool, ``[a, b]`` -> list)."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings onto a nested dict (in place) and return it."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. retrieval.k=5)")
        path, _, raw = item.partition("=")
        parts = [p for p in path.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"override {item!r} has an empty key")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{part}' is not a section")
        node[parts[-1]] = _parse_scalar(raw)
    return data


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping with an error that names the file and the problem."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must contain a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults < YAML file < ``--set`` overrides, as one typed :class:`Config`.

    The retrieval keys the YAML file or the overrides set are recorded in ``retrieval.explicit``:
    an index's stored settings sit between the defaults and those keys
    (:meth:`RetrievalConfig.layered_on`).
    """
    data = read_yaml(path) if path else {}
    source = str(path) if path else "<defaults>"
    if overrides:
        apply_overrides(data, overrides)
        source = f"{source} + --set overrides" if path else "--set overrides"
    cfg = from_dict(Config, data, source=source)
    section = data.get("retrieval")
    cfg.retrieval.explicit = tuple(sorted(section)) if isinstance(section, dict) else ()
    return cfg


__all__ = [
    "CDIRConfig",
    "Config",
    "ConfigError",
    "DEFAULT_API_PORT",
    "DEFAULT_RETRIEVAL_PORT",
    "EvalConfig",
    "ModelConfig",
    "RetrievalConfig",
    "RewardConfig",
    "RolloutConfig",
    "ServerConfig",
    "TrainConfig",
    "apply_overrides",
    "from_dict",
    "load_config",
    "read_yaml",
]
