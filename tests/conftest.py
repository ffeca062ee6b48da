"""Shared test setup: offline, CPU-only, deterministic. Tiny models are built once per session."""

from __future__ import annotations

import os

# Tests never reach a model hub and never use a GPU, whatever the machine has.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["CUDA_VISIBLE_DEVICES"] = ""


# --- tiny real models (medrwr.testing), built once per session into the user cache ----------------------
# (set MEDRWR_CACHE_DIR to move the cache; the folders are keyed by medrwr.testing.BUILD_VERSION)

import pytest


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """MEDRWR_CACHE_DIR pointed at one per-session folder, so KB/encoder builds are isolated from the user's cache."""
    d = tmp_path_factory.getbasetemp() / "medrwr-shared-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDRWR_CACHE_DIR", str(d))
        yield d


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The real Qwen2.5-VL tokenizer rebuilt offline (left padding, eos <|im_end|>, pad <|endoftext|>)."""
    from medrwr.testing import qwen2_5_tokenizer

    return qwen2_5_tokenizer()


@pytest.fixture(scope="session")
def tiny_vlm_dir():
    """Folder of a tiny random Qwen2.5-VL + processor (load with medrwr...processing.load_processor)."""
    from medrwr.testing import tiny_qwen2_5_vl

    return tiny_qwen2_5_vl()


@pytest.fixture(scope="session")
def tiny_lm_dir():
    """Folder of a tiny random text-only Qwen2ForCausalLM + the Qwen2.5 tokenizer."""
    from medrwr.testing import tiny_causal_lm

    return tiny_causal_lm()


@pytest.fixture(scope="session")
def tiny_clip_dir():
    """Folder of a tiny random CLIPModel + CLIPProcessor (projection dim 32)."""
    from medrwr.testing import tiny_clip

    return tiny_clip()


# --- one real server on loopback, in a thread (as httpx's tests/conftest.py does) -----------------------


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1 in a background thread; restartable on the same port.

    The socket is bound by us (port 0 by default, so tests never collide); ``stop`` uses uvicorn's
    graceful shutdown and fails the test if the thread does not end.
    """

    def __init__(self, app, config=None, port: int = 0):
        from medrwr.config import ServerConfig

        self.app = app
        self.config = config or ServerConfig()
        self.port = port
        self.server = None
        self.thread = None
        self._sock = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ServerThread":
        import threading
        import time

        from medrwr.retrieval.service.server import bind_socket, make_uvicorn_server

        self._sock = bind_socket("127.0.0.1", self.port)
        self.port = self._sock.getsockname()[1]
        self.server = make_uvicorn_server(self.app, self.config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
            self.thread.join(timeout=30)
            assert not self.thread.is_alive(), "server thread did not stop"
            self._sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture(scope="session")
def loopback_server():
    """``loopback_server(app, config=None, port=0)``: a :class:`ServerThread`; use it as a context manager."""
    return ServerThread
