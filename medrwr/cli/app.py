"""The ``medrwr`` command: the root app, ``index``, ``retrieve`` and ``ask``; the other sub-commands live in
sibling modules (``serve``, ``train``, ``eval``, ``demo``) and are registered here.

Commands stay thin: parse flags, load the config, call a layer, render. Heavy libraries are imported inside
commands, so ``medrwr --help`` is instant.
"""

from __future__ import annotations

import logging
import sys
from typing import List, Optional

import typer
from rich.markup import escape

from medrwr.cli import data as data_cmd
from medrwr.cli import demo as demo_cmd
from medrwr.cli import eval as eval_cmd
from medrwr.cli import kb as kb_cmd
from medrwr.cli import train as train_cmd
from medrwr.cli._shared import ConfigOpt, SetOpt, _config, apply_policy_flags, console, err_console
from medrwr.cli.serve import serve_app
from medrwr.config import Config
from medrwr.errors import CLIError, MedRwRError

app = typer.Typer(
    name="medrwr",
    help="MedRwR: multimodal medical reasoning-with-retrieval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
index_app = typer.Typer(help="Build and inspect knowledge-base indexes.", no_args_is_help=True)
app.add_typer(index_app, name="index")
app.add_typer(serve_app, name="serve")
app.add_typer(train_cmd.train_app, name="train")
app.add_typer(eval_cmd.eval_app, name="eval")
app.add_typer(data_cmd.data_app, name="data")
app.add_typer(kb_cmd.kb_app, name="kb")
app.command("demo")(demo_cmd.demo)


def _version(value: bool) -> None:
    if value:
        from medrwr import __version__

        typer.echo(f"medrwr {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level."),
    debug: bool = typer.Option(False, "--debug", help="Log at DEBUG level."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# ------------------------------------------------------------------------------------------ retrieval


@index_app.command("build")
def index_build(
    corpus: str = typer.Option(..., "--corpus", help="Corpus file (JSONL, TSV/CSV, parquet) or 'default'."),
    out: str = typer.Option(..., "--out", help="Index directory to write (atomically)."),
    preset: str = typer.Option("auto", "--preset", help="Column mapping: auto, medrag, medrwr, flashrag, plain."),
    text_column: Optional[str] = typer.Option(None, "--text-column", help="Column holding the passage text "
                                              "(default: the preset's: text, content or contents)."),
    title_column: Optional[str] = typer.Option(None, "--title-column", help="Column holding the title "
                                               "(default: title)."),
    id_column: Optional[str] = typer.Option(None, "--id-column", help="Column holding the document id "
                                            "(default: id, _id, doc_id or docid; else the row number)."),
    allow_multiline_csv: bool = typer.Option(False, "--allow-multiline-csv", help="Accept TSV/CSV records whose "
                                             "quoted fields span lines (otherwise an error: usually an unclosed quote)."),
    config: Optional[str] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
) -> None:
    """Build a BM25 + dense index over a corpus."""
    import time

    cfg = _config(config, overrides)
    if corpus == "default" and (text_column or title_column or id_column or allow_multiline_csv or preset != "auto"):
        raise CLIError("--preset, --text-column, --title-column, --id-column and --allow-multiline-csv apply to a "
                       "corpus file; --corpus default builds the shipped KB, whose layout is fixed")
    t0 = time.perf_counter()
    try:
        if corpus == "default":
            from medrwr.kb.default import build_default_kb

            path = build_default_kb(out, config=cfg.retrieval if (config or overrides) else None)
        else:
            from medrwr.retrieval.index.corpus import read_corpus
            from medrwr.retrieval.index.hybrid import build_index

            docs = read_corpus(corpus, preset=preset, text_column=text_column, title_column=title_column,
                               id_column=id_column, allow_multiline=allow_multiline_csv)
            path = build_index(docs, out, config=cfg.retrieval)
        from medrwr.retrieval.index.store import load_manifest

        manifest = load_manifest(path, verify=False)
    except (ValueError, OSError, ImportError) as exc:
        raise CLIError(str(exc)) from None
    console.print(
        f"[green]built[/green] {path}: {manifest.get('doc_count')} documents, "
        f"modes {', '.join(manifest.get('modes', []))}, in {time.perf_counter() - t0:.1f}s"
    )


@index_app.command("info")
def index_info(
    path: str = typer.Argument(..., help="Index directory."),
    verify: bool = typer.Option(False, "--verify", help="Hash every file in full (slow for big indexes)."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Show an index's manifest: documents, encoder, build config, checksums.

    A changed or damaged file does not hide the manifest: it is shown with the checksum failure,
    and the command exits 1."""
    import json

    from rich.table import Table

    from medrwr.errors import IndexCorrupt, IndexStoreError
    from medrwr.retrieval.index.store import load_manifest

    damage = None
    try:
        m = load_manifest(path, verify=False)  # no manifest, unreadable, wrong version: nothing to show
        try:
            load_manifest(path, verify="full" if verify else True)
        except IndexCorrupt as exc:
            damage = str(exc)
    except IndexStoreError as exc:
        raise CLIError(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(m, indent=2, ensure_ascii=False))
        if damage:
            raise CLIError(f"the index is damaged: {damage}")
        return
    files = m.get("files", {})
    corpus = m.get("corpus") or {}
    enc = m.get("encoder") or {}
    dense = m.get("dense") or {}
    rows = [
        ("path", str(path)),
        ("format version", str(m.get("format_version"))),
        ("created", f"{m.get('created_at')} (medrwr {m.get('medrwr_version')}, {m.get('build_seconds')}s)"),
        ("documents", str(m.get("doc_count"))),
        ("sources", ", ".join(f"{k or '-'}: {v}" for k, v in (corpus.get("sources") or {}).items())),
        ("corpus sha256", str(corpus.get("sha256"))),
        ("modes", ", ".join(m.get("modes", []))),
        ("bm25", ", ".join(f"{k}={v}" for k, v in (m.get("bm25") or {}).items())),
        ("encoder", f"{enc.get('name')} ({enc.get('spec')!r}, dim {enc.get('dim')})"
         if enc else "none (BM25 only)"),
        ("faiss", ", ".join(f"{k}={v}" for k, v in dense.items() if v is not None) if dense else "none"),
        ("files", f"{len(files)} files, {sum(f.get('size', 0) for f in files.values()) / 1e6:.1f} MB"),
        ("checksums", "[red]FAILED[/red] (see below)" if damage
         else "ok (every byte hashed)" if verify else "ok (size + sha256; big files: ends only)"),
    ]
    known = {"kind", "doc_count", "corpus", "modes", "bm25", "encoder", "dense", "build_config",
             "build_seconds", "format_version", "created_at", "medrwr_version", "files", "checksum_policy"}
    for key, value in m.items():
        if key not in known:
            rows.append((key, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)))
    table = Table(title=f"index {path}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in rows:
        table.add_row(key, value if key == "checksums" else escape(value))
    console.print(table)
    if damage:
        raise CLIError(f"the index is damaged: {damage}")


@index_app.command("build-images")
def index_build_images(
    images: Optional[str] = typer.Option(None, "--images", help="Folder of images (PNG, JPEG, ..., DICOM)."),
    reports: Optional[str] = typer.Option(
        None, "--reports", help="JSONL / JSON / CSV / TSV file, one row per image: columns 'image', 'report'."
    ),
    out: Optional[str] = typer.Option(None, "--out", help="Image index directory to write (atomically)."),
    encoder: str = typer.Option(
        "pixel-stats", "--encoder", help="pixel-stats, hf:<CLIP folder or hub id>, open_clip:<id>, a CLIP folder."
    ),
    demo: bool = typer.Option(False, "--demo", help="Build the demo index from packaged sample images instead."),
    copy: bool = typer.Option(True, "--copy/--no-copy", help="Copy the images into the index, or refer to them."),
) -> None:
    """Build a CDIR image index from a folder of images and a reports file (see README, "Try CDIR")."""
    import time

    from medrwr.errors import ImageIndexError, IndexStoreError
    from medrwr.retrieval.index import images as image_index

    t0 = time.perf_counter()
    try:
        if demo:
            if images or reports:
                raise CLIError("--demo builds from packaged sample images; drop --images/--reports (or --demo)")
            path = (image_index.build_demo_image_index(out, encoder=encoder) if out
                    else image_index.ensure_demo_image_index(encoder=encoder))
        else:
            missing = [flag for flag, v in (("--images", images), ("--reports", reports), ("--out", out)) if not v]
            if missing:
                raise CLIError(f"missing {', '.join(missing)}: medrwr index build-images --images DIR "
                               "--reports FILE --out DIR (or --demo)", code=2)
            assert images and reports and out
            path = image_index.ImageIndex.build(reports, out, images_dir=images, encoder=encoder,
                                                copy_images=copy, progress=True)
            skipped = image_index.unreported_images(images, reports, exclude=out)
            if skipped:
                names = ", ".join(p.name for p in skipped[:3]) + (" ..." if len(skipped) > 3 else "")
                err_console.print(f"[yellow]note:[/yellow] {len(skipped)} image(s) in {images} have no report "
                                  f"row and were not indexed: {escape(names)}", highlight=False, soft_wrap=True)
        idx = image_index.ImageIndex.load(path)
    except (ImageIndexError, IndexStoreError) as exc:
        raise CLIError(str(exc)) from None
    except (ValueError, OSError, ImportError) as exc:
        raise CLIError(f"{type(exc).__name__}: {exc}") from None
    name = "demo" if demo and not out else path
    console.print(f"[green]built[/green] image index {path}: {idx.doc_count} images, encoder {idx.encoder.name}, "
                  f"in {time.perf_counter() - t0:.1f}s. Use it with: medrwr ask ... --image IMG --cdir "
                  f"--set cdir.image_index={name}", highlight=False, soft_wrap=True)


@app.command("retrieve")
def retrieve(
    query: List[str] = typer.Argument(..., help="One or more queries."),
    index: Optional[str] = typer.Option(None, "--index", help="Index directory (default: shipped KB)."),
    mode: Optional[str] = typer.Option(
        None, "--mode", help="bm25, dense or hybrid (default: the index's own, hybrid when it has embeddings)."
    ),
    k: Optional[int] = typer.Option(None, "-k", help=f"Hits per query, 1 to 100 (default: retrieval.k, {Config().retrieval.k})."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    explain: bool = typer.Option(
        False, "--explain", help="Show why each hit ranks where it does: BM25 and dense rank/score, name match, fused score."
    ),
    config: Optional[str] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
) -> None:
    """Search the knowledge base (an index, the default KB, or a server with --set retrieval.url=URL)."""
    import json

    from medrwr.retrieval import limits
    from medrwr.retrieval.base import SEARCH_MODES
    from medrwr.retrieval.index.hybrid import HybridRetriever

    cfg = _config(config, overrides)
    rcfg = cfg.retrieval
    if mode is not None and mode not in SEARCH_MODES:
        raise CLIError(f"unknown mode {mode!r}; choose one of {', '.join(SEARCH_MODES)}")
    k = rcfg.k if k is None else k
    limits.check_queries(query)  # the limits the server and every retriever apply, before any index loads
    limits.check_k(k)
    if index:
        rcfg.index = index
    from medrwr.retrieval.open import open_retriever

    if explain and rcfg.url:
        raise CLIError("--explain needs a local index (the server does not send the parts' ranks); drop retrieval.url")
    why: list[list[dict]] = []
    try:
        with open_retriever(cfg) as retriever:
            results = retriever.search(query, k=k, mode=mode)
            mode = mode or retriever.default_mode
            about = retriever.describe()
            if explain:
                if not isinstance(retriever, HybridRetriever):
                    raise CLIError(f"--explain needs a local text index; {type(retriever).__name__} cannot explain")
                why = retriever.explain(query, k=k, mode=mode)
                c = retriever.config
                about["fusion"] = (f"; fused = {c.bm25_weight:g}/(k+bm25 rank) + {c.dense_weight:g}/(k+dense rank)"
                                   f" + {c.name_weight:g}/(k+exact-name rank) + {c.name_bm25_weight:g}/(k+name-bm25 "
                                   f"rank) + {c.clinical_weight:g}/(k+clinical rank) + {c.name_dense_weight:g}/(k+name-dense rank)"
                                   f", k = {c.rrf_k}")
    except (ValueError, OSError, ImportError) as exc:
        raise CLIError(str(exc)) from None
    path = about.get("path") or about.get("url")
    if as_json:
        payload = {
            "index": str(path),
            "mode": mode,
            "k": k,
            "results": [{"query": q, "hits": [h.to_dict() for h in hits]} for q, hits in zip(query, results)],
        }
        for entry, expl in zip(payload["results"], why):
            for hit, e in zip(entry["hits"], expl):
                hit["explain"] = {key: e[key] for key in ("bm25", "dense", "name_match", "name_bm25_rank", "clinical_rank",
                                                          "name_dense_rank", "fused_score")}
        typer.echo(json.dumps(payload, ensure_ascii=False, indent=2))
        return
    from rich.table import Table

    if why:
        _print_explained(query, why, mode, k, about)
        return
    for q, hits in zip(query, results):
        shown = repr(q) if len(q) <= 80 else f"{q[:80]!r}… ({len(q)} characters)"
        table = Table(title=f"{shown}  ({mode}, k={k}, {about['doc_count']} documents)", expand=True)
        table.add_column("#", justify="right", no_wrap=True)
        table.add_column("score", justify="right", no_wrap=True)
        table.add_column("source", no_wrap=True)
        table.add_column("title", overflow="fold", ratio=1)
        table.add_column("text", overflow="fold", ratio=3)
        for rank, h in enumerate(hits, 1):
            snippet = h.text if len(h.text) <= 240 else h.text[:240].rsplit(" ", 1)[0] + " ..."
            table.add_row(str(rank), f"{h.score:.4f}", h.source, h.title, snippet)
        if not hits:
            table.add_row("-", "-", "-", "-", "no matching documents")
        console.print(table)


def _print_explained(queries: List[str], why: list[list[dict]], mode: str, k: int, about: dict) -> None:
    """``retrieve --explain``: one row per hit with each part's rank and score (``-``: that part missed it)."""
    from rich.table import Table

    cfg = (about.get("fusion") or "") if mode == "hybrid" else ""

    def part(e: dict | None) -> str:
        return "-" if e is None else f"#{e['rank']} {e['score']:.2f}"

    for q, rows in zip(queries, why):
        shown = repr(q) if len(q) <= 80 else f"{q[:80]!r}…"
        table = Table(title=f"{shown}  ({mode}, k={k}, {about['doc_count']} documents){cfg}", expand=True)
        for col in ("#", "fused", "bm25", "dense", "name", "name~", "clin", "title", "source"):
            # name: "exact" when the query is one of the hit's names, else its rank by BM25 over names;
            # name~: its rank by the closest embedded name
            table.add_column(col, overflow="fold", no_wrap=col not in ("title", "source"),
                             ratio=1 if col == "title" else None, min_width=24 if col == "title" else None)
        for rank, e in enumerate(rows, 1):
            fused = "-" if e["fused_score"] is None else f"{e['fused_score']:.4f}"
            name = "exact" if e["name_match"] else (f"#{e['name_bm25_rank']}" if e.get("name_bm25_rank") else "-")
            clinical = f"#{e['clinical_rank']}" if e.get("clinical_rank") else "-"
            near = f"#{e['name_dense_rank']}" if e.get("name_dense_rank") else "-"
            table.add_row(str(rank), fused, part(e["bm25"]), part(e["dense"]), name, near, clinical,
                          f"{e['title']} ({e['doc_id']})", e["source"])
        if not rows:
            table.add_row("-", "-", "-", "-", "-", "-", "-", "-", "no matching documents")
        console.print(table)


# ------------------------------------------------------------------------------------------ rollout


def _check_ask_inputs(cfg: Config, question: str, options: List[str], images: List[str]) -> None:
    """What ``ask`` can refuse in well under a second: the question and options (the shared limits),
    the image files (exist and decode), the index (has a manifest) or the retrieval server (answers)."""
    from pathlib import Path

    from medrwr.protocol import OPTION_LETTERS
    from medrwr.retrieval import limits

    limits.check_question(question, options, max_options=len(OPTION_LETTERS))
    if images:
        from medrwr.errors import ImageLoadError
        from medrwr.retrieval.image_io import load_image

        for p in images:
            try:
                load_image(p)
            except ImageLoadError as exc:
                raise CLIError(f"--image {p}: {exc}") from None
    rcfg = cfg.retrieval
    if rcfg.url:
        from medrwr.errors import RetrievalError
        from medrwr.retrieval.service.client import RetrievalClient

        try:
            with RetrievalClient(rcfg.url, timeout=5.0, retries=0) as client:
                client.health()
        except (RetrievalError, ValueError) as exc:
            why = exc.__cause__ or exc
            raise CLIError(
                f"the retrieval server at {rcfg.url} (retrieval.url) does not answer ({why}); start it with "
                "`medrwr serve retrieval` in another terminal, or drop retrieval.url to search in-process"
            ) from None
    elif rcfg.index:
        from medrwr.retrieval.index.store import load_manifest

        load_manifest(rcfg.index, verify=False)  # IndexStoreError: one line, says how to build it
    named = cfg.cdir.image_index
    if cfg.cdir.enabled and named and named.strip() != "demo" \
            and not (Path(named).expanduser() / "manifest.json").is_file():
        raise CLIError(f"image index {named} does not exist; build one with `medrwr index build-images "
                       f"--images DIR --reports FILE --out {named}`, or use --image-index demo")


@app.command("ask")
def ask(
    question: str = typer.Argument(..., help="The question (options as 'A. ...' lines, or via --option)."),
    image: Optional[List[str]] = typer.Option(None, "--image", help="Image file(s); needs a VLM."),
    option: Optional[List[str]] = typer.Option(None, "--option", help="An answer option (repeatable)."),
    model: Optional[str] = typer.Option(None, "--model", help="Hub id or local path of the policy."),
    index: Optional[str] = typer.Option(None, "--index", help="Index directory (default: shipped KB)."),
    cdir: bool = typer.Option(False, "--cdir", help="Confidence-driven image re-retrieval."),
    image_index: Optional[str] = typer.Option(None, "--image-index", help="Image index for --cdir."),
    as_json: bool = typer.Option(False, "--json", help="Print the trace as JSON."),
    constrain: Optional[bool] = typer.Option(
        None, "--constrain/--no-constrain",
        help="Grammar-constrained decoding of the protocol (rollout.constrain). Default: on for the packaged "
             "SmolLM2 demo policy, off for other models.",
    ),
    threads: Optional[int] = typer.Option(
        None, "--threads", min=1, help="torch CPU threads (model.threads; default 1 on <= 2 cores, else half)."
    ),
    config: Optional[str] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
) -> None:
    """Answer one question with the reasoning-with-retrieval loop and print the trace."""
    cfg = _config(config, overrides)
    apply_policy_flags(cfg, model=model, threads=threads, index=index, image_index=image_index)
    if constrain is not None:
        cfg.rollout.constrain = "protocol" if constrain else "none"
    if cdir:
        cfg.cdir.enabled = True
    images = list(image or [])
    _check_ask_inputs(cfg, question, list(option or []), images)  # every cheap check before any model loads
    from medrwr.rollout.backends import BackendError, policy_supports_images

    if images and cfg.model.backend == "hf" and policy_supports_images(cfg.model.name) is False:
        which = "the default policy (SmolLM2-135M-Instruct)" if cfg.model.name is None else cfg.model.name
        raise CLIError(
            f"--image needs a vision-language model, and {which} is text-only. Pass one with "
            "--model Qwen/Qwen2.5-VL-7B-Instruct (or the released Luxuriant16/Med-RwR, or a local Qwen2.5-VL folder)."
        )
    from medrwr.rollout.engine import RolloutRequest, engine_from_config
    from medrwr.rollout.trace import render_trace

    try:
        # a plain line, not a live spinner: a first-time KB build or policy conversion streams its own bars here
        err_console.print("[dim]loading the policy and the retriever…[/dim]", highlight=False)
        engine = engine_from_config(cfg)
        if images and not engine.backend.supports_images:
            raise CLIError(
                f"--image needs a vision-language model; {cfg.model.name} is text-only. "
                "Pass one with --model Qwen/Qwen2.5-VL-7B-Instruct or a local Qwen2.5-VL folder."
            )
        with err_console.status("reasoning…"):
            trace = engine.run([RolloutRequest(question=question, options=list(option) if option else None,
                                               images=images)])[0]
    except (BackendError, ValueError, OSError, ImportError) as exc:
        raise CLIError(str(exc)) from None
    if as_json:
        typer.echo(trace.to_json())
    else:
        console.print(render_trace(trace))


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; returns the exit code instead of raising SystemExit."""
    try:
        app(args=argv if argv is not None else sys.argv[1:], prog_name="medrwr")
    except MedRwRError as exc:  # every deliberate error: one line, the class's exit code, no traceback
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except SystemExit as exc:  # click exits with the command's code (usage errors: 2)
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
