"""``open_retriever(config)``: the one place where a config becomes a Retriever.

Which retriever (first match wins):

1. ``retrieval.url`` set: the HTTP client to that server. Never a silent fall-back to a local index:
   if the server cannot be reached, searching raises :class:`~medrwr.errors.RetrievalUnavailable`
   naming the URL.
2. ``retrieval.index`` set: that index directory (split into ``shards`` local shards, or deployed
   on Ray Serve with ``ray=True``).
3. Otherwise the shipped default knowledge base (:func:`medrwr.kb.default.ensure_default_index`).

Search settings (mode, rrf_k, bm25_weight, dense_weight, fusion_depth, batch_size, n_threads,
ivf_nprobe, hnsw_ef_search, ...) follow one precedence rule, lowest first:

    dataclass defaults < the index manifest's ``build_config`` < the YAML file < ``--set``

i.e. an index keeps the settings it was built with unless the user sets a key explicitly
(:meth:`medrwr.config.RetrievalConfig.layered_on`). With a server URL, the server's own settings
play the manifest's part; only ``mode`` travels with each request. ``k`` is the caller's choice
(``retrieval.k``), passed to every ``search``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from medrwr.config import CDIRConfig, Config, RetrievalConfig
from medrwr.retrieval.base import ImageRetriever, Retriever

logger = logging.getLogger(__name__)


def _retrieval(config: Config | RetrievalConfig | None) -> RetrievalConfig:
    if config is None:
        return RetrievalConfig()
    return config.retrieval if isinstance(config, Config) else config


def index_path(config: Config | RetrievalConfig | None = None) -> Path:
    """The index directory a config names: ``retrieval.index``, else the default KB (built on first use)."""
    rcfg = _retrieval(config)
    if rcfg.index:
        return Path(rcfg.index).expanduser()
    from medrwr.kb.default import ensure_default_index

    return Path(ensure_default_index())


def search_config(config: Config | RetrievalConfig | None, path: str | os.PathLike) -> RetrievalConfig:
    """The settings to search the index at ``path`` with: its manifest < the user's explicit keys."""
    from medrwr.retrieval.index.store import load_manifest

    manifest = load_manifest(path, verify=False)
    return _retrieval(config).layered_on(manifest.get("build_config"))


def open_retriever(
    config: Config | RetrievalConfig | None = None,
    *,
    shards: int = 1,
    ray: bool = False,
    shards_dir: str | os.PathLike | None = None,
    encoder: Any = None,
    verify: bool | str = True,
) -> Retriever:
    """The text Retriever a config names (see the module docstring for the rules).

    ``shards`` > 1 splits the index (shard directories are reused when already written) and
    searches the shards in this process, or on Ray Serve with ``ray=True``: the same results as
    the unsharded index. ``encoder`` overrides the query encoder of a local index.
    """
    rcfg = _retrieval(config)
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if rcfg.url:
        if shards > 1 or ray:
            raise ValueError(f"retrieval.url is {rcfg.url}: a server cannot be sharded from here; drop --ray/--shards")
        chosen = rcfg.explicit_keys() - {"url", "mode", "k", "index"}
        if chosen:
            logger.warning("retrieval.url is set: %s apply on the server, not here", ", ".join(sorted(chosen)))
        from medrwr.retrieval.service.client import RetrievalClient

        return RetrievalClient(rcfg.url, mode=rcfg.mode if "mode" in rcfg.explicit_keys() else None)
    path = index_path(rcfg)
    settings = search_config(rcfg, path)
    from medrwr.retrieval.index.hybrid import HybridRetriever

    if shards == 1 and not ray:
        return HybridRetriever.load(path, encoder=encoder, config=settings, verify=verify)
    from medrwr.retrieval.index.shards import split_index

    out = Path(shards_dir) if shards_dir else path.parent / f"{path.name}.shards-{shards}"
    shard_dirs = split_index(path, out, shards)
    if ray:
        from medrwr.retrieval.service.ray import deploy

        return deploy(shard_dirs, settings)
    return HybridRetriever.from_shard_dirs(shard_dirs, settings, verify=verify)


def open_image_retriever(config: Config | CDIRConfig | None = None, *, demo: bool = True) -> ImageRetriever | None:
    """The CDIR image index a config names (``cdir.image_index``).

    ``cdir.image_index`` is an image index folder (``medrwr index build-images``), or ``demo``: the shipped
    demo index of packaged sample images, built into the cache on first use (a folder literally called
    ``demo`` is ``./demo``). Without one: the demo index when ``demo`` (what ``ask --cdir`` uses), else
    None (a retrieval server then has no image route). A missing folder raises
    :class:`~medrwr.errors.ImageIndexError` saying how to build one.
    """
    cdir = config.cdir if isinstance(config, Config) else (config or CDIRConfig())
    from medrwr.errors import ImageIndexError
    from medrwr.retrieval.index.images import DEMO_NAME, ImageIndex, ensure_demo_image_index

    name = cdir.image_index
    if name and name.strip() != DEMO_NAME:
        path = Path(name).expanduser()
        if not (path / "manifest.json").is_file():
            what = "does not exist" if not path.exists() else "is not an image index (no manifest.json)"
            raise ImageIndexError(
                f"cdir.image_index {name} {what}; build one with `medrwr index build-images --images DIR "
                f"--reports FILE --out {name}`, or use the shipped demo with --set cdir.image_index={DEMO_NAME}"
            )
        return ImageIndex.load(path)
    if not name and not demo:
        return None
    return ImageIndex.load(ensure_demo_image_index())


__all__ = ["index_path", "open_image_retriever", "open_retriever", "search_config"]
