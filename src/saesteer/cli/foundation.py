"""``saesteer models``, ``saesteer collect`` and ``saesteer data show | list | fetch``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from saesteer.core import check_output_path, ensure

from ._app import app
from .options import DEVICE_HELP, THREADS_HELP, model_option
from .presets import DTYPE_HELP, PRESET_OPT

data_app = typer.Typer(help="Prompt sets and corpora: preview any data spec.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@app.command("models")
def models_cmd(as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table")) -> None:
    """List the built-in models (size, licence, source, whether converted into the cache)."""
    from dataclasses import asdict

    from saesteer.models import cache_dir, list_models

    infos = list_models()
    if as_json:
        typer.echo(json.dumps([asdict(m) for m in infos], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"built-in models (cache: {cache_dir()})")
    for c in ("name", "params", "licence", "source", "cached", "fp32 size", "notes"):
        t.add_column(c, no_wrap=c in ("name", "params", "cached"))
    for m in infos:
        t.add_row(m.name, m.params, m.licence, m.source, "yes" if m.cached else "no", f"{m.size_gib:.1f} GiB", m.notes)
    Console().print(t)


@app.command("collect")
def collect_cmd(
    model: str = model_option(),
    layer: Optional[int] = typer.Option(None, help="decoder layer whose output (residual stream) is collected "
                                        "(required unless --preset gives it)"),
    data: str = typer.Option("chat-mix", help="chat-mix[:text=N,chat=N,harmful=N,harmless=N,answer=N,repeat=N] or any data spec"),
    tokens: int = typer.Option(100_000, help="activation rows to collect"),
    out: Path = typer.Option(..., help="output folder (sharded safetensors + meta.json)"),
    batch_size: int = typer.Option(16, help="documents per forward pass"),
    context_len: int = typer.Option(256, help="truncate documents to this many tokens"),
    dtype: str = typer.Option("float32", help="storage dtype: float32, float16 or bfloat16"),
    shard_tokens: int = typer.Option(32_768, help="rows per shard"),
    seed: int = typer.Option(0, help="seed of the data sample and order"),
    max_norm_ratio: float = typer.Option(30.0, help="drop rows whose norm exceeds this multiple of the running "
                                                    "median row norm (massive activations); 0 keeps every row"),
    overwrite: bool = typer.Option(False, help="replace what is in --out (default: resume the same collection)"),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    model_dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP),
    preset: Optional[str] = PRESET_OPT,
) -> None:
    """Collect residual-stream activations after LAYER (forward stops there). Re-running resumes.

    Distributed: torchrun --nproc_per_node N -m saesteer collect ... splits the batches across N processes that
    write one cache (a resume needs the same N)."""
    check_output_path(out)  # before any work: a bad path fails fast
    from saesteer.activations import ActivationCache, CollectConfig, collect

    from .presets import from_preset

    v = from_preset(preset, model=model, layer=layer, model_dtype=model_dtype)
    model, layer, model_dtype = v["model"], v["layer"], v["model_dtype"]
    ensure(layer is not None, "give --layer (or a --preset)")
    cfg = CollectConfig(model=model, layer=layer, model_dtype=model_dtype or "auto", data=data, tokens=tokens, out=str(out), batch_size=batch_size,
                        context_len=context_len, dtype=dtype, shard_tokens=shard_tokens, seed=seed, threads=threads,
                        max_norm_ratio=max_norm_ratio or None,
                        device=device, overwrite=overwrite)
    path = collect(cfg)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: rank 0 reports for all
        return
    c = ActivationCache(path)
    rate = c.meta.get("tokens_per_s_last_run")
    typer.echo(f"{c.n_tokens:,} tokens x {c.d_model} (layer {c.layer}, {c.meta['dtype']}) in {c.n_shards} shards → "
               f"{path}" + (f"  [{rate:.0f} tok/s]" if rate else ""))


@data_app.command("show")
def data_show(
    spec: str = typer.Argument(..., help="named set (xstest, advbench:train, ...), file[.jsonl|.csv|.parquet][:column] or hf:owner/name"),
    limit: int = typer.Option(5, help="rows to show"),
    split: Optional[str] = typer.Option(None, help="split / subset (also SPEC:SPLIT)"),
    as_json: bool = typer.Option(False, "--json", help="print the items as JSON lines"),
) -> None:
    """Preview a prompt set or corpus: count, labels and the first rows."""
    from collections import Counter
    from dataclasses import asdict

    from saesteer.data import load_prompts

    ensure(limit >= 0, "--limit must be >= 0")
    items = load_prompts(spec, split=split)
    if as_json:
        for it in items[:limit]:
            typer.echo(json.dumps(asdict(it), default=str))
        return
    from rich.console import Console
    from rich.table import Table

    labels = Counter(it.label or "-" for it in items)
    t = Table(title=f"{spec}: {len(items):,} items; labels " + ", ".join(f"{k} {v}" for k, v in labels.most_common()))
    for c in ("id", "label", "category", "prompt / conversation"):
        t.add_column(c, overflow="fold")
    for it in items[:limit]:
        text = it.prompt if it.messages is None else " | ".join(f"{m['role']}: {m['content']}" for m in it.messages)
        t.add_row(it.id, it.label or "", it.category or "", (text or "")[:300])
    Console().print(t)


@data_app.command("list")
def data_list(as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table")) -> None:
    """Every named set: upstream source, licence, size, sha256 and where it is present (resolution order)."""
    from saesteer.data import list_sets, search_roots

    rows = list_sets()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    roots = " → ".join(f"{o}={p}" for o, p in search_roots())
    t = Table(title=f"named data sets (resolution: {roots})")
    for c in ("name", "licence", "MB", "sha256", "present", "source"):
        t.add_column(c, overflow="fold", no_wrap=c in ("MB", "sha256", "present"))
    for r in rows:
        name = "\n".join([r["name"], *r["aliases"]])
        sha = "\n".join(f["sha256"][:12] for f in r["files"])
        where = r["where"].split(":", 1)[0] if r["where"] else ("no" if r["fetchable"] else "no (manual)")
        t.add_row(name, r["licence"].split(" (")[0], f"{r['size'] / 1e6:.2f}", sha, where, r["short_source"])
    Console(width=max(Console().width, 120)).print(t)
    typer.echo("full addresses, per-file sha256 and citations: saesteer data list --json")


@data_app.command("fetch")
def data_fetch(
    names: Optional[list[str]] = typer.Argument(None, help="named sets to fetch (see `saesteer data list`)"),
    all_sets: bool = typer.Option(False, "--all", help="fetch every set that has an automatic source"),
    dest: Optional[Path] = typer.Option(None, help="data dir to write to (default: the user data dir)"),
    force: bool = typer.Option(False, help="download again even when the file is present and verified"),
) -> None:
    """Download named sets with checksum verification and atomic writes (resumes interrupted downloads)."""
    check_output_path(dest, what="--dest")  # before any work: a bad path fails fast
    from saesteer.data import fetch_sets, user_data_dir

    ensure(bool(names) != all_sets, "name the sets to fetch, or pass --all (not both)")
    results = fetch_sets(None if all_sets else list(names or []), dest=dest, force=force)
    for r in results:
        typer.echo(f"{r.status:8s} {r.set:16s} {r.path}" + (f"  ← {r.source}" if r.status in ("fetched", "skipped") else ""))
    typer.echo(f"data dir: {dest or user_data_dir()}")
