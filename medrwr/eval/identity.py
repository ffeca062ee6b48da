"""What makes an evaluation run this run (``RUN_DIR/run.json`` ``identity``): model, data file hashes, decoding,
seeds, retrieval index manifest hash, scoring preset and judge; compared on resume (:func:`prepare_run_dir`)."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from medrwr._io import sha256_file
from medrwr.config import Config
from medrwr.errors import EvalRunError
from medrwr.eval.results import RUN_JSON
from medrwr.eval.text_policy import is_openai_model

logger = logging.getLogger(__name__)

__all__ = ["fingerprint", "prepare_run_dir", "run_identity"]

DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet", ".pkl", ".txt", ".zip")
_MAX_HASHED_FILES = 64


def _data_files(path: Path) -> dict[str, str]:
    if path.is_file():
        return {path.name: sha256_file(path)}
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
    if len(files) > _MAX_HASHED_FILES:
        logger.info("hashing the first %d of %d data files", _MAX_HASHED_FILES, len(files))
    return {str(p.relative_to(path)): sha256_file(p) for p in files[:_MAX_HASHED_FILES]}


def _manifest_sha(path: Path | None) -> str | None:
    return sha256_file(path / "manifest.json") if path is not None and (path / "manifest.json").is_file() else None


def _model_identity(cfg: Config) -> dict[str, Any]:
    name = cfg.model.name
    ident: dict[str, Any] = {"name": name or "packaged:SmolLM2-135M-Instruct", "backend": cfg.model.backend,
                             "dtype": cfg.model.dtype}
    if is_openai_model(name):
        ident.update(backend="openai-chat", base_url=cfg.eval.base_url, continuation=cfg.eval.continuation)
        return ident
    if name is None:
        from medrwr.assets import smollm2_gguf_path

        gguf = smollm2_gguf_path()
        ident.update(path=str(gguf), size=gguf.stat().st_size if gguf.exists() else None)
    elif Path(name).expanduser().exists():
        p = Path(name).expanduser().resolve()
        ident["path"] = str(p)
        conf = p / "config.json"
        ident["config_sha256"] = sha256_file(conf) if conf.is_file() else (sha256_file(p) if p.is_file() else None)
    return ident


def run_identity(cfg: Config, benchmark: str, data: str | Path, modes: list[str]) -> dict[str, Any]:
    """What makes a run this run (compared on resume), plus the record of seeds and decoding settings."""
    from medrwr.rollout.constrain import resolve_constrain

    r = cfg.rollout
    ident: dict[str, Any] = {
        "benchmark": benchmark,
        "split": cfg.eval.split,
        "languages": cfg.eval.languages,
        "data": {"path": str(Path(data).resolve()), "files": _data_files(Path(data))},
        "model": _model_identity(cfg),
        "decoding": {
            "temperature": r.temperature, "top_p": r.top_p, "seed": r.seed, "max_rounds": r.max_rounds,
            "queries_per_turn": r.queries_per_turn, "max_new_tokens_per_turn": r.max_new_tokens_per_turn,
            "max_total_new_tokens": r.max_total_new_tokens, "max_inserted_tokens": r.max_inserted_tokens,
            "max_image_pixels": r.max_image_pixels, "constrain": resolve_constrain(cfg.model, r),
        },
        "preset": cfg.eval.preset,
    }
    if cfg.eval.judge_model:
        ident["judge"] = {"model": cfg.eval.judge_model, "url": cfg.eval.judge_url}
    if any(m != "direct" for m in modes):
        rc = cfg.retrieval
        ret: dict[str, Any] = {"k": rc.k, "mode": rc.mode if "mode" in rc.explicit_keys() else None}
        if rc.url:
            ret["url"] = rc.url
        else:
            from medrwr.retrieval.open import index_path

            path = index_path(cfg)
            ret.update(index=str(path.resolve()), manifest_sha256=_manifest_sha(path))
        ident["retrieval"] = ret
    if "rwr_cdir" in modes:
        c = cfg.cdir
        img = c.image_index
        path = Path(img).expanduser() if img and img.strip() != "demo" else None
        ident["cdir"] = {"threshold": c.threshold, "k": c.k, "image_index": str(path.resolve()) if path else "demo",
                         "manifest_sha256": _manifest_sha(path)}
    return ident


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys set in both identities with different values (a key only one side has is not a change)."""
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in sorted(a.keys() & b.keys()) if a[k] != b[k]]


def prepare_run_dir(run_dir: Path, ident: dict[str, Any], force: bool) -> dict[str, Any]:
    """Check (or start over) the run directory; return the previous run.json (empty when new)."""
    run_json = run_dir / RUN_JSON
    prev: dict[str, Any] = {}
    if run_json.is_file():
        try:
            prev = json.loads(run_json.read_text(encoding="utf-8"))
        except ValueError:
            raise EvalRunError(f"{run_json} is not valid JSON; use a new --out or --force to start over") from None
    if force and (prev or (run_dir / "results.jsonl").exists()):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for name in ("results.jsonl", RUN_JSON):
            p = run_dir / name
            if p.exists():
                p.rename(p.with_name(f"{name}.bak-{stamp}"))
        logger.warning("--force: starting %s over (previous files kept as *.bak-%s)", run_dir, stamp)
        return {}
    if prev:
        diff = _differences(prev.get("identity", {}), ident)
        if diff:
            raise EvalRunError(
                f"{run_dir} holds a run with a different configuration ({'; '.join(diff[:4])}"
                f"{'; …' if len(diff) > 4 else ''}); use a new --out, or --force to start it over"
            )
    return prev


def fingerprint(ident: dict[str, Any]) -> str:
    """A short hash of a run identity (shown in reports)."""
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:12]
