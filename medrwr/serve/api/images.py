"""Image inputs of chat requests: ``image_url`` parts as data URLs, ``file://`` under an allowed root, or (only when
enabled) ``http(s)://``; each decoded fully before any model work, so a bad image is a 400 naming its part.

Why so strict: the API may be reachable by other local users, so a URL must never read an arbitrary file or
make the server fetch from the network unless its operator asked for it (``--allow-file-root``,
``--allow-remote-images``). A DICOM (``data:application/dicom;base64,…`` or a ``.dcm`` file) is read by
:func:`medrwr.retrieval.image_io.load_image`.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from medrwr.config import ServerConfig
from medrwr.retrieval.service.errors import APIError, bad

_REMOTE_TIMEOUT_S = 10.0


def image_bytes(url: str, where: str, config: ServerConfig, max_bytes: int) -> bytes:
    """The raw bytes an ``image_url.url`` names (``where`` names the part in errors)."""
    if url.startswith("data:"):
        head, sep, payload = url.partition(",")
        if not sep or ";base64" not in head:
            raise bad(f"{where}: a data URL must be 'data:<mime>;base64,<data>'", "invalid_image_url", where)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise bad(f"{where}: the data URL is not valid base64 ({exc})", "invalid_base64", where) from None
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return _file_bytes(unquote(parsed.path), where, config, max_bytes)
    if parsed.scheme in ("http", "https"):
        if not config.allow_remote_images:
            raise bad(
                f"{where}: remote image URLs are refused by this server; send the image as a data URL "
                "(data:image/png;base64,...) or start the server with --allow-remote-images",
                "remote_image_refused", where,
            )
        return _remote_bytes(url, where, max_bytes)
    raise bad(f"{where}: unsupported image URL scheme {parsed.scheme or url[:16]!r}; use a data URL",
              "invalid_image_url", where)


def _file_bytes(path: str, where: str, config: ServerConfig, max_bytes: int) -> bytes:
    if not config.allow_file_root:
        raise bad(f"{where}: file:// image URLs are refused by this server; send a data URL, or start the server "
                  "with --allow-file-root DIR", "file_image_refused", where)
    root = Path(config.allow_file_root).expanduser().resolve()
    p = Path(path).expanduser().resolve()
    if p != root and root not in p.parents:
        raise bad(f"{where}: {path} is outside the allowed file root {root}", "file_outside_root", where)
    if not p.is_file():
        raise bad(f"{where}: image file {path} does not exist", "image_not_found", where)
    if p.stat().st_size > max_bytes:
        raise bad(f"{where}: image file {path} is larger than {max_bytes} bytes", "image_too_large", where)
    return p.read_bytes()


def _remote_bytes(url: str, where: str, max_bytes: int) -> bytes:
    import httpx

    try:
        with httpx.stream("GET", url, timeout=_REMOTE_TIMEOUT_S, follow_redirects=True) as r:
            r.raise_for_status()
            out = bytearray()
            for chunk in r.iter_bytes():
                out += chunk
                if len(out) > max_bytes:
                    raise bad(f"{where}: the remote image is larger than {max_bytes} bytes", "image_too_large", where)
            return bytes(out)
    except httpx.HTTPError as exc:
        raise bad(f"{where}: could not fetch {url}: {exc}", "image_fetch_failed", where) from None


def decode_image(data: bytes, where: str, config: ServerConfig, max_pixels: int | None = None) -> Any:
    """An RGB PIL image, downscaled to ``max_pixels`` (``rollout.max_image_pixels``); 400 when it does not decode
    or has more than ``server.max_input_image_pixels`` pixels."""
    from PIL import Image

    from medrwr.errors import MedRwRError
    from medrwr.retrieval.image_io import load_image

    limit = config.max_input_image_pixels
    is_dicom = len(data) > 132 and data[128:132] == b"DICM"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if not is_dicom:
                with Image.open(io.BytesIO(data)) as probe:  # reads the header only
                    w, h = probe.size
                if w * h > limit:
                    raise bad(f"{where}: the image is {w}x{h} = {w * h} pixels; the limit is {limit} "
                              "(server.max_input_image_pixels)", "image_too_large", where)
            img = load_image(data)
    except APIError:
        raise
    except MedRwRError as exc:
        raise bad(f"{where}: the image could not be decoded ({exc})", "invalid_image", where) from None
    except Exception as exc:  # PIL raises many types for corrupt input; all are the client's fault
        kind = "not a recognised image format" if "cannot identify" in str(exc) else f"{type(exc).__name__}: {exc}"
        raise bad(f"{where}: the image could not be decoded ({kind})", "invalid_image", where) from None
    if img.width * img.height > limit:
        raise bad(f"{where}: the image has {img.width * img.height} pixels; the limit is {limit}",
                  "image_too_large", where)
    if max_pixels and img.width * img.height > max_pixels:
        scale = math.sqrt(max_pixels / (img.width * img.height))
        img = img.resize((max(1, int(img.width * scale)), max(1, int(img.height * scale))))
    return img


def thumbnail_data_url(image: Any, size: int = 256) -> str | None:
    """A small PNG data URL of an image (a PIL image, path or bytes) for the page; None when it cannot be read."""
    from medrwr.retrieval.image_io import load_image

    try:
        img = load_image(image).copy()
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
    except Exception:  # noqa: BLE001 - a missing thumbnail must not fail the answer
        return None
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


__all__ = ["decode_image", "image_bytes", "thumbnail_data_url"]
