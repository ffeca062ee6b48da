"""Opening images: PIL images, paths (PNG/JPEG/... or DICOM) and raw bytes, as RGB PIL images."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any, Union

import numpy as np

from medrwr.errors import ImageLoadError

logger = logging.getLogger(__name__)

ImageInput = Union["PIL.Image.Image", str, Path, bytes]  # noqa: F821



def _describe(x: Any) -> str:
    if isinstance(x, (bytes, bytearray)):
        return f"<{len(x)} bytes starting {bytes(x[:8])!r}>"
    return repr(x) if not isinstance(x, (str, Path)) else str(x)


def dicom_to_pil(path_or_file: Any) -> Any:
    from PIL import Image

    try:
        import pydicom
    except ImportError as exc:
        raise ImageLoadError(f"{_describe(path_or_file)} is a DICOM file; install pydicom to read it") from exc
    ds = pydicom.dcmread(path_or_file)
    arr = ds.pixel_array.astype(np.float32)
    if arr.ndim == 3 and arr.shape[-1] not in (3, 4):
        arr = arr[arr.shape[0] // 2]  # a volume: take the middle slice
    lo, hi = np.percentile(arr, [0.5, 99.5])
    arr = np.clip((arr - lo) / max(hi - lo, 1e-6), 0, 1) * 255
    return Image.fromarray(arr.astype(np.uint8))


def load_image(image: ImageInput) -> Any:
    """Open a PIL image, a path (PNG/JPEG/... or DICOM) or raw bytes as an RGB PIL image."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if len(data) > 132 and data[128:132] == b"DICM":
            return dicom_to_pil(io.BytesIO(data)).convert("RGB")
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise ImageLoadError(
                f"cannot decode image bytes {_describe(data)}: not a PNG/JPEG/... image ({exc}). "
                "Pass a PIL image, a path, or the raw bytes of an image file."
            ) from None
        return img.convert("RGB")
    if isinstance(image, (str, Path)):
        p = Path(image).expanduser()
        if not p.is_file():
            raise ImageLoadError(f"image file {p} does not exist")
        if p.suffix.lower() in (".dcm", ".dicom"):
            return dicom_to_pil(p).convert("RGB")
        try:
            with Image.open(p) as img:
                img.load()
                return img.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise ImageLoadError(f"cannot read image {p}: {exc}") from None
    raise ImageLoadError(f"unsupported image input of type {type(image).__name__}; pass a PIL image, path or bytes")
