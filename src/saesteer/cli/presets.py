"""``saesteer presets`` and the shared ``--preset`` / ``--dtype`` options.

A command that takes ``--preset NAME`` calls :func:`from_preset` with the options the preset can fill; every option the
user did not give on the command line (or through its environment variable) takes the preset's value, explicit
options win.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import typer

from ._app import app

PRESET_OPT = typer.Option(None, "--preset", help="fill model, layer, SAE, clamp and dtype from a preset (see "
                                                 "`saesteer presets`); explicit options win")
DTYPE_HELP = ("model dtype: float32 | bfloat16 | float16 | auto (default: the preset's, else auto = bfloat16 on CUDA "
              "and on CPUs with AVX512-BF16 / AMX, float32 elsewhere; SAESTEER_DTYPE sets it); SAE and clamp math "
              "stay float32")
DTYPE_OPT = typer.Option(None, "--dtype", help=DTYPE_HELP)
QUANTIZE_HELP = ("auto | none | packed | int8 | int4 | int8-decode | int4-decode: weight-only quantized linears (int8: "
                 "per-row scales; int4: groups of 64; the -decode modes use them only for the decode steps of <= 4 "
                 "sequences and the model's own weights, packed for oneDNN on bf16 CPUs, for prompts and batches; "
                 "packed: bf16 weights reordered once for oneDNN, the same numbers; auto: int8-decode on CPU in bf16, "
                 "else none). The residual stream, SAE and clamp keep their dtype")
QUANTIZE_OPT = typer.Option("none", "--quantize", help=QUANTIZE_HELP)
QUANTIZE_AUTO_OPT = typer.Option("auto", "--quantize", help=QUANTIZE_HELP)


def _explicit(name: str) -> bool:
    """Whether option ``name`` was given on the command line / by its env var in the running command."""
    try:  # typer >= 0.2x runs on its own copy of click
        from typer._click.core import ParameterSource
        from typer._click.globals import get_current_context
    except ImportError:
        from click import get_current_context
        from click.core import ParameterSource

    ctx = get_current_context(silent=True)
    if ctx is None:
        return False
    src = ctx.get_parameter_source(name)
    return src in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT, ParameterSource.PROMPT)


def from_preset(preset: Optional[str], **given: Any) -> dict[str, Any]:
    """``given`` (option name -> current value) with every option not given explicitly replaced by the preset's value.

    Names the preset fills: ``model``, ``layer``, ``dtype`` / ``model_dtype`` (model dtype), ``k``, ``expansion``,
    ``sae`` (public SAEs: resolved through the hub into a local folder), ``clamp`` (``[first clamp]``), ``clamp_csv``
    (``"first clamp"``), ``clamps`` (the whole grid, ``"10,12"``). Others pass through unchanged."""
    if not preset:
        return dict(given)
    from saesteer.steering import get_preset, resolve_sae

    p = get_preset(preset)
    table: dict[str, Any] = {
        "model": lambda: p.model, "layer": lambda: p.layer, "dtype": lambda: p.dtype, "model_dtype": lambda: p.dtype,
        "k": lambda: p.k, "expansion": lambda: p.expansion, "clamp": lambda: [p.clamps[0]],
        "clamp_csv": lambda: f"{p.clamps[0]:g}", "clamps": lambda: ",".join(f"{c:g}" for c in p.clamps),
        "sae": lambda: resolve_sae(p) if p.public else None,
    }
    out = dict(given)
    for name in given:
        opt = "clamp" if name == "clamp_csv" else name
        if name in table and not _explicit(opt):
            v = table[name]()
            if v is not None:
                out[name] = v
    return out


@app.command("presets")
def presets_cmd(as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table")) -> None:
    """List the presets: the paper's setting (obrien2024) and chat models with public SAEs (release, hook, licence)."""
    from saesteer.steering import list_presets

    rows = list_presets()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title="presets (saesteer COMMAND --preset NAME; explicit options win)", show_lines=True)
    for c in ("name", "model", "layer / hook", "SAE", "width", "clamps", "dtype", "licences"):
        t.add_column(c, overflow="fold", no_wrap=c in ("width", "dtype"))
    for r in rows:
        sae = "train your own (k={k}, {e}x)".format(k=r["k"], e=r["expansion"]) if r["sae_source"] == "train" else \
            r["sae_source"] + (f"\nSAELens {r['saelens'][0]} / {r['saelens'][1]}" if r["saelens"] else "")
        t.add_row(r["name"], r["model"], f"{r['layer']} / {r['hook_point']}", f"{sae}\n[{r['sae_layout']}, "
                  f"{r['sae_arch']}]", f"{r['width']:,}", ", ".join(f"{c:g}" for c in r["clamps"]), r["dtype"],
                  f"model: {r['model_licence']}\nSAE: {r['sae_licence']}")
    Console(width=max(Console().width, 140)).print(t)
    typer.echo("citations and notes: saesteer presets --json")
