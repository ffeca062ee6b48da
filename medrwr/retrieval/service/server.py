"""Running the retrieval service: bind the port, open the retriever a config names, run uvicorn.

``serve`` is what ``medrwr serve retrieval`` runs; ``--ray --shards N`` passes ``shards``/``ray`` on
to :func:`medrwr.retrieval.open.open_retriever`, which splits the index and deploys it on Ray Serve.
The app itself (routes, batching, errors) is :func:`medrwr.retrieval.service.app.create_app`.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from medrwr.config import Config, ServerConfig
from medrwr.errors import PortInUse
from medrwr.retrieval.base import ImageRetriever, Retriever

logger = logging.getLogger(__name__)


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the listening socket ourselves so a taken port is a clear error (and port 0 works)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno in (98, 48, 10048):  # EADDRINUSE on Linux, macOS, Windows
            err = PortInUse(f"port {port} on {host} is already in use: stop the other server or pick another with --port")
            err.errno = exc.errno
            raise err from None
        raise OSError(exc.errno, f"cannot bind {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def make_uvicorn_server(app: Any, config: ServerConfig, log_level: str = "warning") -> Any:
    """A uvicorn.Server for ``app`` with our settings (graceful shutdown, no access log)."""
    import uvicorn

    ucfg = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=config.graceful_shutdown_s,
        backlog=2048,
        timeout_keep_alive=30,
        lifespan="on",
    )
    return uvicorn.Server(ucfg)


def serve(
    config: Config | ServerConfig | None = None,
    *,
    retriever: Retriever | None = None,
    image_retriever: ImageRetriever | None = None,
    shards: int = 1,
    ray: bool = False,
    log_level: str = "warning",
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve the retriever ``config`` names (:func:`~medrwr.retrieval.open.open_retriever`) until interrupted.

    ``config`` is a full :class:`medrwr.config.Config` (its ``server``, ``retrieval`` and ``cdir``
    sections are used) or a :class:`ServerConfig`. The port is bound before the index is loaded,
    so a taken port fails at once. ``shards``/``ray`` serve a split index (``--ray --shards N``).
    ``on_ready(url)`` is called once the socket is bound.
    """
    from medrwr.retrieval.open import open_image_retriever, open_retriever
    from medrwr.retrieval.service.app import create_app

    full = config if isinstance(config, Config) else Config(server=config or ServerConfig())
    scfg = full.server
    sock = bind_socket(scfg.host, scfg.port)  # fail fast, before loading a large index or starting Ray
    try:
        if retriever is None:
            retriever = open_retriever(full, shards=shards, ray=ray)
        if image_retriever is None:
            image_retriever = open_image_retriever(full, demo=False)
        t0 = time.perf_counter()
        retriever.warmup()  # load the encoder now, not on the first request
        logger.info("retriever warmed up in %.1fs", time.perf_counter() - t0)
        app = create_app(retriever, image_retriever, scfg)
        server = make_uvicorn_server(app, scfg, log_level=log_level)
        url = f"http://{_url_host(scfg.host)}:{sock.getsockname()[1]}"
        logger.info("serving retrieval at %s", url)
        if on_ready is not None:
            on_ready(url)
        server.run(sockets=[sock])
    finally:
        sock.close()
        if ray:
            from medrwr.retrieval.service.ray import shutdown

            shutdown()


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


__all__ = ["bind_socket", "make_uvicorn_server", "serve"]
