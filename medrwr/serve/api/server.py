"""Running the chat API: bind the port first (a taken port fails before any model loads), build the engine the
config names (policy, retriever, image index), run uvicorn with graceful drain. ``serve_api`` is what
``medrwr serve api`` and ``medrwr demo`` run."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from medrwr.config import Config
from medrwr.retrieval.service.server import _url_host, bind_socket, make_uvicorn_server
from medrwr.rollout.engine import RolloutEngine

logger = logging.getLogger(__name__)


def model_name(cfg: Config) -> str:
    """How ``/v1/models`` names the policy: its hub id or folder, or the packaged default."""
    return str(cfg.model.name) if cfg.model.name else "medrwr-smollm2-135m-demo"


def build_engine(cfg: Config) -> RolloutEngine:
    """The engine of ``cfg``; an image index named by ``cdir.image_index`` is opened even when CDIR is off, so
    requests can turn it on (``medrwr_cdir``)."""
    from medrwr.retrieval.open import open_image_retriever
    from medrwr.rollout.engine import engine_from_config

    image_retriever = open_image_retriever(cfg, demo=False) if cfg.cdir.image_index else None
    engine = engine_from_config(cfg, image_retriever=image_retriever)
    if engine.retriever is not None:
        engine.retriever.warmup()
    return engine


def serve_api(
    cfg: Config,
    *,
    engine: RolloutEngine | None = None,
    log_level: str = "warning",
    on_ready: Callable[[str], None] | None = None,
    drop_images: bool = False,
) -> None:
    """Serve the chat API on ``server.host``:``server.api_port`` until interrupted (Ctrl-C drains).
    ``drop_images``: a text-only policy ignores images (with a warning) instead of refusing them (the demo)."""
    from medrwr.serve.api.app import create_app

    scfg = cfg.server
    sock = bind_socket(scfg.host, scfg.api_port)
    try:
        if engine is None:
            engine = build_engine(cfg)
        app = create_app(engine, scfg, model_name=model_name(cfg), drop_images=drop_images)
        server: Any = make_uvicorn_server(app, dataclasses.replace(scfg, port=scfg.api_port), log_level=log_level)
        url = f"http://{_url_host(scfg.host)}:{sock.getsockname()[1]}"
        logger.info("serving the chat API at %s", url)
        if on_ready is not None:
            on_ready(url)
        server.run(sockets=[sock])
    finally:
        sock.close()


__all__ = ["build_engine", "model_name", "serve_api"]
