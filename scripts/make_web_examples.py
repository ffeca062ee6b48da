"""Draw the web page's example images (medrwr/serve/web/example-*.png): synthetic, no patient data.

Each image is painted from shapes and seeded noise with Pillow and numpy, so it is reproducible and free of
any licence but the project's (MIT). They only look roughly like their modality: they exist to let a visitor
try the page without an image of their own, not to be diagnosed. Run ``python scripts/make_web_examples.py``
after changing them; ``medrwr/serve/web/EXAMPLES.md`` records what each one is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

OUT = Path(__file__).resolve().parents[1] / "medrwr" / "serve" / "web"
SIZE = 256


def _finish(canvas: Image.Image, rng: np.random.Generator, blur: float, noise: float) -> Image.Image:
    img = canvas.filter(ImageFilter.GaussianBlur(blur))
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0.0, noise, (SIZE, SIZE))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")


def chest_xray(opacity: bool) -> Image.Image:
    """A frontal chest radiograph look-alike: dark lungs, spine and heart shadow, ribs; optionally a right
    lower-zone opacity (a consolidation look-alike)."""
    rng = np.random.default_rng(7 if opacity else 3)
    im = Image.new("L", (SIZE, SIZE), 15)  # air outside the body
    d = ImageDraw.Draw(im)
    d.rounded_rectangle([12, 8, 244, 300], radius=60, fill=165)  # chest wall soft tissue
    d.ellipse([34, 30, 124, 226], fill=55)  # right lung (image left)
    d.ellipse([132, 30, 222, 226], fill=60)  # left lung
    d.rectangle([118, 20, 138, SIZE], fill=215)  # spine / mediastinum
    for i in range(7):  # posterior ribs, as arcs over both lungs
        y = 44 + i * 25
        d.arc([28, y - 22, 128, y + 22], 200, 340, fill=135, width=5)
        d.arc([128, y - 22, 228, y + 22], 200, 340, fill=135, width=5)
    d.ellipse([112, 120, 190, 210], fill=185)  # heart shadow
    d.ellipse([36, 200, 126, 250], fill=200)  # right hemidiaphragm
    d.ellipse([130, 206, 224, 252], fill=200)  # left hemidiaphragm
    if opacity:
        d.ellipse([48, 140, 108, 200], fill=150)
    return _finish(im, rng, blur=4.0, noise=3.0)


def head_ct() -> Image.Image:
    """An axial head CT look-alike: bright skull ring, grey brain, dark ventricles, a small bright focus."""
    rng = np.random.default_rng(11)
    im = Image.new("L", (SIZE, SIZE), 8)
    d = ImageDraw.Draw(im)
    d.ellipse([30, 18, 226, 238], fill=245)  # skull
    d.ellipse([42, 30, 214, 226], fill=110)  # brain
    d.ellipse([104, 96, 124, 150], fill=40)  # lateral ventricles
    d.ellipse([132, 96, 152, 150], fill=40)
    d.ellipse([150, 70, 176, 94], fill=190)  # hyperdense focus
    return _finish(im, rng, blur=1.5, noise=3.0)


def main() -> None:
    images = {
        "example-chest.png": chest_xray(opacity=True),
        "example-chest-clear.png": chest_xray(opacity=False),
        "example-head-ct.png": head_ct(),
    }
    for name, img in images.items():
        img.save(OUT / name, optimize=True)
        print(f"wrote {OUT / name} ({(OUT / name).stat().st_size} bytes)")


if __name__ == "__main__":
    main()
