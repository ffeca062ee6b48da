"""Query-semantic rewards (docs/method.md, "Rewards"): σq = σq_text + σq_img.

**Text**, σq_text ∈ [0, 2]::

    σq_text = |Q ∩ G| / |Q| + |K ∩ G| / |K|

Q, K and G are sets of medical entities (:mod:`medrwr.rewards.entities`) in the sample's queries, in the
retrieved documents and in the gold content. A term whose denominator is 0 is 0; σq_text = 0 when no query
was issued. The reward takes sets; the extractor is separate, so the same sets give the same reward whichever
extractor produced them. Queries and documents come from the trace (``queries``, ``retrievals[*].hits``)
or, for plain strings, from the query and retrieve blocks of the completion (every block, not only the last;
"None" and "Retrieval failed" blocks hold no documents).

Gold content = the ``gold_content`` column when given, else the gold option's text (``options`` column, or
the ``A. …`` lines of the prompt) or the free-text gold answer, plus the ``explanation`` column
(aliases ``rationale``) when the sample has one. (The reference code reduced the gold answer to its letter
before extracting entities and read the documents from the prompt, where there are none; both terms were
effectively 0.)

**Image**, σq_img ∈ [-1, 1]: the mean, over the sample's images and queries, of the cosine between the image
embedding and the query-text embedding, from a joint image–text encoder
(:func:`medrwr.retrieval.encoders.image.load_image_encoder`: ``hf:<CLIP folder or hub id>``,
``open_clip:hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224`` as in the paper). 0 when no query
or no image. Without a joint encoder (none configured, or an image-only one such as ``pixel-stats``) the term
is 0.0 for every sample and a warning says so once -- it never pretends. Images come from the ``images``
(or ``image``) column, else from the trace's ``images`` (paths or ``data:`` URIs). Embeddings are computed
in-process and batched; image embeddings are cached by content hash (LRU), so a GRPO group's shared image is
encoded once.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from medrwr.rewards._common import (
    SampleView,
    column,
    completion_text_all,
    option_map,
    resolve_gold,
    sample_views,
)
from medrwr.rewards.accuracy import ANSWER_COLUMNS, OPTION_COLUMNS
from medrwr.rewards.entities import EntityExtractor, get_entity_extractor

logger = logging.getLogger(__name__)

TEXT_RANGE = (0.0, 2.0)
IMAGE_RANGE = (-1.0, 1.0)
EXPLANATION_COLUMNS = ("explanation", "rationale")


def semantic_overlap(q: set, k: set, g: set) -> float:
    """|Q∩G|/|Q| + |K∩G|/|K| with 0 for an empty denominator (no-query handling is the caller's).

    >>> semantic_overlap({"pneumothorax", "trauma"}, {"pneumothorax"}, {"pneumothorax"})
    1.5
    >>> semantic_overlap(set(), set(), {"x"})
    0.0
    """
    a = len(q & g) / len(q) if q else 0.0
    b = len(k & g) / len(k) if k else 0.0
    return a + b


def gold_contents(n: int, answer: Any = None, **kwargs: Any) -> list[str]:
    """The gold content of each sample: gold option text (or free-text answer) + explanation."""
    explicit = column(kwargs, ("gold_content",), n)
    answers = column({"answer": answer, **kwargs}, ANSWER_COLUMNS, n)
    options = column(kwargs, OPTION_COLUMNS, n)
    explanations = column(kwargs, EXPLANATION_COLUMNS, n)
    prompts = column(kwargs, ("prompts", "prompt"), n)
    out = []
    for i in range(n):
        if isinstance(explicit[i], str):
            out.append(explicit[i])
            continue
        gold = resolve_gold(answers[i], options[i])
        parts = []
        if gold.letter is not None:
            text = gold.option_text
            if not text and prompts[i] is not None:
                text = option_map(completion_text_all(prompts[i])).get(gold.letter)
            if text:
                parts.append(text)
        elif gold.text:
            parts.append(gold.text)
        if isinstance(explanations[i], str) and explanations[i].strip():
            parts.append(explanations[i])
        out.append("\n".join(parts))
    return out


def _text_scores(views: list[SampleView], extractor: EntityExtractor, golds: list[str]) -> list[float]:
    texts: list[str] = []
    index: dict[str, int] = {}

    def slot(t: str) -> int:
        if t not in index:
            index[t] = len(texts)
            texts.append(t)
        return index[t]

    plan = []
    for v, g in zip(views, golds):
        if not v.queries:
            plan.append(None)
            continue
        plan.append(([slot(q) for q in v.queries], [slot(d) for d in v.documents], slot(g)))
    sets = extractor.extract(texts) if texts else []
    if len(sets) != len(texts):
        raise ValueError(f"entity extractor {extractor!r} returned {len(sets)} sets for {len(texts)} texts")
    out = []
    for p in plan:
        if p is None:
            out.append(0.0)
            continue
        qs, ks, g = p
        q = set().union(*(sets[i] for i in qs)) if qs else set()
        k = set().union(*(sets[i] for i in ks)) if ks else set()
        out.append(semantic_overlap(q, k, sets[g]))
    return out


class _QueryTextReward:
    """Picklable σq_text with its entity extractor bound."""

    __name__ = "query_semantic_text_reward"

    def __init__(self, extractor: EntityExtractor | str | None = None):
        self.extractor = get_entity_extractor(extractor)

    def score(self, views: list[SampleView], answer: Any = None, **kwargs: Any) -> list[float]:
        return _text_scores(views, self.extractor, gold_contents(len(views), answer, **kwargs))

    def __call__(self, completions=None, traces=None, answer=None, **kwargs: Any) -> list[float]:
        return self.score(sample_views(completions, traces), answer, **kwargs)


def get_query_semantic_text_reward(extractor: EntityExtractor | str | None = None) -> _QueryTextReward:
    """σq_text with an entity extractor (default: the built-in lexicon; ``"scispacy"``; or any object)."""
    return _QueryTextReward(extractor)


_default_text_reward: _QueryTextReward | None = None


def query_semantic_text_reward(completions=None, traces=None, answer=None, **kwargs: Any) -> list[float]:
    """σq_text ∈ [0, 2] with the default lexicon extractor.

    >>> query_semantic_text_reward(
    ...     completions=["<think>a</think><query>tension pneumothorax</query>"
    ...                  "<retrieve>\\n(1) Pneumothorax is air in the pleural space.\\n(2) Asthma.\\n</retrieve>"
    ...                  "<think>b</think><answer>B</answer>", "<think>a</think><answer>B</answer>"],
    ...     answer=["B", "B"], options=[["Pneumonia", "Pneumothorax"]] * 2,
    ... )
    [1.5, 0.0]
    """
    global _default_text_reward
    if _default_text_reward is None:
        _default_text_reward = _QueryTextReward()
    return _default_text_reward(completions=completions, traces=traces, answer=answer, **kwargs)


# ------------------------------------------------------------------------------------------------ image


class _LRU:
    """A small LRU map; pickles as an empty map of the same size (caches are per process)."""

    def __init__(self, size: int):
        self.size = size
        self.data: OrderedDict[str, Any] = OrderedDict()

    def __getstate__(self) -> dict:
        return {"size": self.size}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["size"])

    def __len__(self) -> int:
        return len(self.data)

    def get_item(self, key: str):
        v = self.data.get(key)
        if v is not None:
            self.data.move_to_end(key)
        return v

    def put(self, key: str, value) -> None:
        if self.size <= 0:
            return
        self.data[key] = value
        self.data.move_to_end(key)
        while len(self.data) > self.size:
            self.data.popitem(last=False)


def _image_key(image: Any) -> tuple[str, Any] | None:
    """A content key and a loadable form for one image input, or None when it is not an image."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency of the image path
        Image = None  # type: ignore[assignment]
    if Image is not None and isinstance(image, Image.Image):
        h = hashlib.sha1(image.tobytes()).hexdigest()
        return f"pil:{image.mode}:{image.size}:{h}", image
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        return f"bytes:{hashlib.sha1(data).hexdigest()}", data
    if isinstance(image, dict):  # datasets' Image feature: {"bytes": ..., "path": ...}
        if image.get("bytes"):
            return _image_key(image["bytes"])
        if image.get("path"):
            return _image_key(image["path"])
        if image.get("image") is not None:
            return _image_key(image["image"])
        return None
    if isinstance(image, (str, os.PathLike)):
        s = str(image)
        if s.startswith("data:"):
            _, _, payload = s.partition(",")
            try:
                data = base64.b64decode(payload, validate=False)
            except (ValueError, TypeError):
                return None
            return f"bytes:{hashlib.sha1(data).hexdigest()}", data
        try:
            st = os.stat(s)
        except OSError:
            return f"path:{s}", s  # loading will fail and be reported
        return f"path:{s}:{st.st_mtime_ns}:{st.st_size}", s
    return None


def _as_list(x: Any) -> list:
    if x is None:
        return []
    if isinstance(x, (list, tuple)):
        return [i for i in x if i is not None]
    return [x]


class _QueryImageReward:
    """σq_img through an :class:`~medrwr.retrieval.encoders.image.ImageEncoder` (see the module docstring)."""

    __name__ = "query_semantic_image_reward"

    def __init__(self, encoder: Any = None, batch_size: int = 32, cache_size: int = 512):
        self._spec = encoder if isinstance(encoder, str) else None
        self._encoder = None if isinstance(encoder, str) else encoder
        self.batch_size = int(batch_size)
        self._image_cache = _LRU(cache_size)
        self._text_cache = _LRU(4 * cache_size)
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_lock"] = None
        if self._spec is not None:
            state["_encoder"] = None  # reloaded from the spec
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    @property
    def encoder(self):
        if self._encoder is None and self._spec is not None:
            from medrwr.retrieval.encoders.image import load_image_encoder

            self._encoder = load_image_encoder(self._spec)
        return self._encoder

    def _disabled_reason(self) -> str | None:
        enc = self.encoder
        if enc is None:
            return (
                "query_semantic_image_reward: no image encoder is configured (rewards.image_encoder), so the "
                "image–query term σq_img is 0.0 for every sample. Set rewards.image_encoder to a joint "
                "image–text model, e.g. 'open_clip:hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224'."
            )
        if not getattr(enc, "joint", False):
            return (
                f"query_semantic_image_reward: image encoder {getattr(enc, 'name', enc)!r} cannot embed text "
                "(joint=False), so σq_img is 0.0 for every sample. Configure a joint image–text encoder "
                "(CLIP family, e.g. BiomedCLIP)."
            )
        return None

    def _embed_images(self, keyed: dict[str, Any]) -> dict[str, np.ndarray | None]:
        from medrwr.errors import ImageLoadError
        from medrwr.retrieval.image_io import load_image

        out: dict[str, np.ndarray | None] = {}
        todo_keys, todo_imgs = [], []
        for key, src in keyed.items():
            hit = self._image_cache.get_item(key)
            if hit is not None:
                out[key] = hit
                continue
            try:
                todo_imgs.append(load_image(src))
                todo_keys.append(key)
            except ImageLoadError as exc:
                self._warn_once(
                    f"img:{key}", f"query_semantic_image_reward: image skipped (σq_img = 0): {exc}"
                )
                out[key] = None
        if todo_imgs:
            emb = np.asarray(
                self.encoder.encode_images(todo_imgs, batch_size=self.batch_size), dtype=np.float32
            )
            for key, e in zip(todo_keys, emb):
                self._image_cache.put(key, e)
                out[key] = e
        return out

    def _embed_texts(self, texts: list[str]) -> dict[str, np.ndarray]:
        out = {}
        todo = []
        for t in texts:
            hit = self._text_cache.get_item(t)
            if hit is not None:
                out[t] = hit
            else:
                todo.append(t)
        if todo:
            emb = np.asarray(
                self.encoder.encode_texts(todo, batch_size=max(self.batch_size, 1)), dtype=np.float32
            )
            for t, e in zip(todo, emb):
                self._text_cache.put(t, e)
                out[t] = e
        return out

    def score(
        self, views: list[SampleView], images: Any = None, image: Any = None, **kwargs: Any
    ) -> list[float]:
        n = len(views)
        if not any(v.queries for v in views):
            return [0.0] * n
        reason = self._disabled_reason()
        if reason is not None:
            self._warn_once("disabled", reason)
            return [0.0] * n
        cols = column({"images": images, "image": image}, ("images", "image"), n)
        per_sample: list[list[str]] = []
        keyed: dict[str, Any] = {}
        for v, col in zip(views, cols):
            sources = _as_list(col) or _as_list(getattr(v.trace, "images", None))
            keys = []
            if v.queries:
                for src in sources:
                    k = _image_key(src)
                    if k is not None:
                        keys.append(k[0])
                        keyed.setdefault(k[0], k[1])
            per_sample.append(keys)
        with self._lock:
            img_emb = self._embed_images(keyed)
            queries = sorted({q[:2000] for v in views for q in v.queries})
            txt_emb = self._embed_texts(queries)
        out = []
        for v, keys in zip(views, per_sample):
            embs = [img_emb[k] for k in keys if img_emb.get(k) is not None]
            if not v.queries or not embs:
                out.append(0.0)
                continue
            I = np.stack(embs)
            Q = np.stack([txt_emb[q[:2000]] for q in v.queries])
            sims = I @ Q.T
            val = float(np.mean(sims)) if sims.size else 0.0
            out.append(min(max(val, -1.0), 1.0) if np.isfinite(val) else 0.0)
        return out

    def __call__(self, completions=None, traces=None, images=None, image=None, **kwargs: Any) -> list[float]:
        return self.score(sample_views(completions, traces), images=images, image=image, **kwargs)


def get_query_semantic_image_reward(
    encoder: Any = None, batch_size: int = 32, cache_size: int = 512
) -> _QueryImageReward:
    """σq_img with an image encoder: an ``ImageEncoder`` object or a :func:`load_image_encoder` spec.

    ``encoder=None`` gives a reward that is 0.0 and warns once that no joint encoder is configured.
    """
    return _QueryImageReward(encoder, batch_size=batch_size, cache_size=cache_size)


_default_image_reward = _QueryImageReward(None)


def query_semantic_image_reward(completions=None, traces=None, images=None, **kwargs: Any) -> list[float]:
    """σq_img without a configured encoder: always 0.0, with a one-time warning (use the factory).

    >>> query_semantic_image_reward(completions=["<think>a</think><answer>A</answer>"])
    [0.0]
    """
    return _default_image_reward(completions=completions, traces=traces, images=images, **kwargs)


__all__ = [
    "IMAGE_RANGE",
    "TEXT_RANGE",
    "get_query_semantic_image_reward",
    "get_query_semantic_text_reward",
    "gold_contents",
    "query_semantic_image_reward",
    "query_semantic_text_reward",
    "semantic_overlap",
]
