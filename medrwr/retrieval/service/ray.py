"""Sharded retrieval on Ray Serve: one deployment per shard, a router deployment, our HTTP service in front.

The router deployment holds a :class:`~medrwr.retrieval.index.hybrid.HybridRetriever` whose shard
set is the shard deployments' handles, so the search (encode once, per-shard top-D, exact merge,
RRF, documents, de-duplication) is the very code an unsharded index runs. :func:`deploy` returns a
:class:`RayShardedRetriever`, the :class:`~medrwr.retrieval.base.Retriever` that calls the router;
``medrwr serve retrieval --ray --shards N`` runs :func:`medrwr.retrieval.service.server.serve` with ``ray=True``,
which opens this through :func:`medrwr.retrieval.open.open_retriever`. Needs the ``ray`` extra.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medrwr.config import RetrievalConfig
from medrwr.retrieval.base import Hit, Retriever, check_mode, check_search_args

logger = logging.getLogger(__name__)


def _ray_serve() -> Any:
    from medrwr._imports import require

    require("ray", "ray", "sharded retrieval on Ray Serve")
    return require("ray.serve", "ray", "sharded retrieval on Ray Serve")


class _RayShards:
    """Ray Serve deployment handles as a shard set; ``.remote()`` returns a response with ``.result()``."""

    def __init__(self, handles: Sequence[Any]):
        self.handles = list(handles)

    def __len__(self) -> int:
        return len(self.handles)

    def submit(self, i: int, method: str, *args: Any) -> Any:
        return getattr(self.handles[i], method).remote(*args)

    def close(self) -> None:
        pass


def build_ray_app(shard_dirs: Sequence[str | os.PathLike], config: RetrievalConfig | None = None,
                  shard_cpus: float = 0.5, router_cpus: float = 0.5) -> Any:
    """The Ray Serve application: one deployment per shard, a router deployment bound to them all."""
    serve = _ray_serve()

    @serve.deployment(ray_actor_options={"num_cpus": shard_cpus}, max_ongoing_requests=8)
    class RetrievalShard:
        def __init__(self, path: str, cfg: RetrievalConfig | None):
            from medrwr.retrieval.index.shards import IndexShard

            self.shard = IndexShard.load(path, cfg)

        def info(self) -> dict[str, Any]:
            return self.shard.info()

        def rankings(self, queries: list[str], depth: int, modes: list[str], vectors: Any = None) -> Any:
            return self.shard.rankings(queries, depth, modes, vectors)

        def documents(self, rows: list[int]) -> list[dict[str, Any]]:
            return self.shard.documents(rows)

    @serve.deployment(ray_actor_options={"num_cpus": router_cpus}, max_ongoing_requests=64)
    class RetrievalRouter:
        def __init__(self, cfg: RetrievalConfig | None, *shard_handles: Any):
            self._handles = list(shard_handles)
            self._cfg = cfg
            self._retriever: Any = None

        async def _router(self) -> Any:
            if self._retriever is None:
                import asyncio

                from medrwr.retrieval.index.hybrid import HybridRetriever

                infos = await asyncio.gather(*(h.info.remote() for h in self._handles))
                self._retriever = HybridRetriever(_RayShards(self._handles), infos, self._cfg)
            return self._retriever

        async def describe(self) -> dict[str, Any]:
            r = await self._router()
            return {**r.describe(), "shards": [{"path": s.get("path"), "rows": s["rows"]} for s in r.infos]}

        async def search(self, queries: list[str], k: int, mode: str | None) -> list[list[dict[str, Any]]]:
            import asyncio

            r = await self._router()
            # The merge code blocks on shard responses: run it off the replica's event loop.
            hits = await asyncio.to_thread(r.search, queries, k, mode)
            return [[h.to_dict() for h in hs] for hs in hits]

    shards = [
        RetrievalShard.options(name=f"medrwr-shard-{i}").bind(str(Path(p).absolute()), config)
        for i, p in enumerate(shard_dirs)
    ]
    return RetrievalRouter.options(name="medrwr-router").bind(config, *shards)


class RayShardedRetriever(Retriever):
    """The :class:`~medrwr.retrieval.base.Retriever` calling the Ray Serve router deployment."""

    def __init__(self, handle: Any, timeout_s: float = 60.0):
        self._handle = handle
        self.timeout_s = timeout_s
        self._info: dict[str, Any] = handle.describe.remote().result(timeout_s=timeout_s)
        self.shards: list[dict[str, Any]] = self._info["shards"]

    @property
    def modes(self) -> tuple[str, ...]:
        return tuple(self._info["modes"])

    @property
    def default_mode(self) -> str:
        return str(self._info["default_mode"])

    @property
    def doc_count(self) -> int:
        return int(self._info["doc_count"])

    def describe(self) -> dict[str, Any]:
        return {**self._info, "kind": "ray-sharded"}

    def search(self, queries: Sequence[str], k: int = 3, mode: str | None = None) -> list[list[Hit]]:
        queries = check_search_args(queries, k)
        mode = check_mode(mode, self.modes, self.default_mode, f"the {len(self.shards)}-shard index")
        if not queries:
            return []
        out = self._handle.search.remote(queries, int(k), mode).result(timeout_s=self.timeout_s)
        return [[Hit.from_dict(h) for h in hs] for hs in out]


def deploy(shard_dirs: Sequence[str | os.PathLike], config: RetrievalConfig | None = None,
           app_name: str = "medrwr-retrieval", **kwargs: Any) -> RayShardedRetriever:
    """Start (or reuse) Ray Serve in the connected Ray cluster and deploy shards + router.

    Call ``ray.init(...)`` first to choose the cluster; otherwise a local one is started. Ray's own
    HTTP proxy is disabled: HTTP goes through our service (``serve(..., ray=True)``).
    """
    import ray

    serve = _ray_serve()
    if not ray.is_initialized():
        ray.init(include_dashboard=False, configure_logging=False)
    serve.start(proxy_location="Disabled")
    t0 = time.perf_counter()
    handle = serve.run(build_ray_app(shard_dirs, config, **kwargs), name=app_name, route_prefix=None)
    retriever = RayShardedRetriever(handle)
    logger.info("deployed %d shards on Ray Serve in %.1fs", len(shard_dirs), time.perf_counter() - t0)
    return retriever


def shutdown() -> None:
    """Stop Ray Serve and Ray (what :func:`deploy` started)."""
    import ray
    from ray import serve as ray_serve

    ray_serve.shutdown()
    ray.shutdown()


__all__ = ["RayShardedRetriever", "build_ray_app", "deploy", "shutdown"]
