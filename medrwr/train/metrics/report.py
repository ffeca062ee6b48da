"""``medrwr train report RUN_DIR``: the curves of ``metrics.jsonl`` as one PNG (matplotlib, Agg backend).

One panel per group: total reward and each reward component, accuracy, KL, retrieval rate and mean rounds,
loss, tokens/s, completion length. Panels whose metrics the run never logged are left out.
"""

from __future__ import annotations

import os
from pathlib import Path

from medrwr.errors import CLIError
from medrwr.train.metrics.log import read_metrics

__all__ = ["PANELS", "render_report"]

PANELS: list[tuple[str, tuple[str, ...]]] = [
    ("reward", ("reward",)),
    ("reward components", ()),  # every rewards/*/mean key
    ("accuracy", ("accuracy",)),
    ("KL to the reference", ("kl",)),
    ("retrieval", ("retrieval_rate", "mean_rounds")),
    ("loss", ("loss",)),
    ("tokens/s", ("tokens_per_s",)),
    ("completion length (model tokens)", ("completions/mean_length",)),
]


def render_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the PNG (default ``RUN_DIR/curves.png``) and return its path."""
    from medrwr._imports import require

    matplotlib = require("matplotlib", "train", "training reports")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run_dir)
    rows = [r for r in read_metrics(run) if "train_runtime" not in r]
    if not rows:
        raise CLIError(f"no metrics in {run}: expected {run / 'metrics.jsonl'} written by `medrwr train`", code=2)
    component_keys = sorted({k for r in rows for k in r if k.startswith("rewards/") and k.endswith("/mean")})
    panels = []
    for title, keys in PANELS:
        keys = tuple(component_keys) if title == "reward components" else keys
        keys = tuple(k for k in keys if any(isinstance(r.get(k), (int, float)) for r in rows))
        if keys:
            panels.append((title, keys))
    cols = 2
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(10, 3 * nrows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{run.name}: {len(rows)} logged steps")
    fig.tight_layout()
    path = Path(out) if out else run / "curves.png"
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
    return path
