"""``saesteer demo``: the whole pipeline on one model with small budgets, resumable stage by stage.

collect → train → sae-eval → features → sweep → report → policy fit (unconditional + gates) → compare.
Each stage is the same CLI command a user would type (printed before it runs), run in its own process
(``python -m saesteer ...``): its memory is returned to the OS when it ends, and its wall time and peak RSS — the
child's own ``ru_maxrss`` from ``wait4``, exact and not sampled — go to ``demo_timings.json`` (rewritten after each
stage). A stage whose output already exists is skipped (its earlier record is kept), so an interrupted demo continues
where it stopped.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from saesteer.core import SaesteerError, atomic_write_json, check_output_path

from ._app import app
from .options import DEVICE_HELP, THREADS_HELP, model_option
from .presets import DTYPE_OPT


@dataclass
class DemoBudget:
    """Sizes of every stage; ``small`` takes ~18 minutes and < 4 GiB on a 2-core AVX512-BF16 CPU with the default model in bf16 (docs/RESULTS.md §0; ~45 minutes in fp32)."""

    tokens: int = 60_000
    """activation tokens collected for the SAE"""
    data: str = "chat-mix:text=150,chat=150,harmful=64,harmless=64"
    """SAE corpus: Wikipedia text + HH chats + harmful / harmless prompts answered by the model itself"""
    epochs: int = 5
    """passes of SAE training over them"""
    val_limit: int = 24
    """harmful and harmless validation prompts each in the feature grid"""
    n_grid: int = 4
    """candidate latents entering the clamp grid"""
    gate_limit: int = 128
    """prompts per gate training / threshold set"""
    eval_limit: int = 24
    """prompts per refusal set in sweep and compare"""
    capability_limit: int = 16
    """MMLU / TruthfulQA questions in sweep and compare"""
    gsm8k_limit: int = 0
    """GSM8K questions in sweep and compare (0: GSM8K skipped; its 8-shot generation is slow on CPU)"""
    sweep_multiples: str = "1,4,16"
    """clamp values of the sweep, as multiples of the chosen latent's max activation (up to one that breaks the
    model, so the capability cost shows)"""
    sweep_limit: int = 16
    """prompts per refusal set in the sweep"""
    sweep_capability_limit: int = 32
    """MMLU / TruthfulQA questions per sweep condition"""


BUDGETS = {
    "small": DemoBudget(),
    "tiny": DemoBudget(tokens=12_000, epochs=3, val_limit=8, n_grid=2, gate_limit=32, eval_limit=8,
                       capability_limit=8, sweep_multiples="2", sweep_limit=8, sweep_capability_limit=8),
}


@dataclass
class Stage:
    name: str
    argv: list[str]
    done_marker: Path
    """the stage counts as done when this file exists (for ``meta.json``: when it also says complete)"""


def _done(marker: Path) -> bool:
    if not marker.exists():
        return False
    if marker.name == "meta.json":  # an activation cache is done only when collection finished
        try:
            return bool(json.loads(marker.read_text()).get("complete"))
        except (OSError, json.JSONDecodeError):
            return False
    return True


def _peak_rss_bytes(ru: os.struct_rusage) -> int:
    """``ru_maxrss`` in bytes (Linux reports KiB, macOS bytes)."""
    return int(ru.ru_maxrss) * (1 if sys.platform == "darwin" else 1024)


def run_stage(argv: list[str]) -> dict[str, float]:
    """Run ``saesteer ARGV`` in a child process; ``{"seconds", "peak_rss_gib"}`` of that child (its own maximum
    resident set size from ``wait4``). A failing stage raises with its exit code (its error is already printed)."""
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "saesteer", *argv])
    try:
        _, status, ru = os.wait4(proc.pid, 0)
    except BaseException:  # Ctrl-C reaches the child too (same process group); do not leave it running
        proc.kill()
        proc.wait()
        raise
    proc.returncode = rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise SaesteerError(f"demo stage `saesteer {' '.join(argv[:1])}` failed with exit code {rc}")
    return {"seconds": round(time.time() - t0, 1), "peak_rss_gib": round(_peak_rss_bytes(ru) / 2**30, 2)}


def _run(stage: Stage) -> dict[str, float] | None:
    """Run a stage unless it is done; its record, or None when skipped."""
    from rich.console import Console

    con = Console(stderr=True)
    if _done(stage.done_marker):
        con.print(f"[dim][demo] {stage.name}: done already ({stage.done_marker})[/dim]")
        return None
    con.rule(f"[bold]demo · {stage.name}")
    con.print("[cyan]$ saesteer " + " ".join(shlex.quote(a) for a in stage.argv))
    rec = run_stage(stage.argv)
    con.print(f"[dim][demo] {stage.name}: {rec['seconds']:.0f} s, peak RSS {rec['peak_rss_gib']:.2f} GiB[/dim]")
    return rec


def _capability(b: DemoBudget, gsm8k_flag: str) -> list[str]:
    """Capability options: GSM8K only when it has a budget (its ``0`` would mean *all* 1,319 questions)."""
    if b.gsm8k_limit > 0:
        return ["--capability", "mmlu,truthfulqa_mc1,gsm8k", gsm8k_flag, str(b.gsm8k_limit)]
    return ["--capability", "mmlu,truthfulqa_mc1"]


def demo_stages(model: str, out: Path, layer: int, b: DemoBudget, common: list[str],
                dtype: str | None = None) -> list[Stage]:
    """The stages; ``dtype`` (``--dtype``) is passed to every stage that runs the model (None: their default)."""
    acts, sae, feats = out / "acts", out / "sae", out / "features"
    dt = ["--dtype", dtype] if dtype else []
    sel = feats / "selection.json"
    pol = out / "policies"
    policies = ["clamp", "clamp+probe", "clamp+sae", "clamp+cast"]  # unconditional (the paper), then gated
    stages = [
        Stage("collect", ["collect", "--model", model, "--layer", str(layer), "--data", b.data,
                          "--tokens", str(b.tokens), "--out", str(acts), *common,
                          *(["--model-dtype", dtype] if dtype else [])], acts / "meta.json"),
        Stage("train", ["train", "--acts", str(acts), "--k", "32", "--expansion", "8", "--epochs", str(b.epochs),
                        "--out", str(sae), *common], sae / "saesteer.json"),
        Stage("sae-eval", ["sae-eval", "--model", model, "--sae", str(sae), "--data", "wikitext2",
                           "--max-docs", "32", "--ce-docs", "8", "--out", str(out / "sae_eval.json"), *common, *dt],
              out / "sae_eval.json"),
        Stage("features", ["features", "--model", model, "--sae", str(sae), "--out", str(feats),
                           "--val-limit", str(b.val_limit), "--n-grid", str(b.n_grid), *common, *dt], sel),
    ]
    stages.append(Stage(
        "sweep + report",
        ["sweep", "--model", model, "--sae", str(sae), "--features-dir", str(feats), "--clamps", "", "--relative", b.sweep_multiples,
         "--limit", str(b.sweep_limit), "--cap-limit", str(b.sweep_capability_limit), *_capability(b, "--gsm8k-limit"),
         "--out", str(out / "sweep"), *common, *dt],
        out / "sweep" / "report" / "index.html"))
    # Gates learn on Arditi train plus the first 40 % of xstest / jbb (safe prompts that look harmful), thresholds
    # on Arditi val plus the next 20 %; compare samples only prompts no policy saw.
    gate_sets = ["--train", "arditi-harmful:train,arditi-harmless:train,xstest#0:0.4,jbb-harmful#0:0.4,jbb-benign#0:0.4",
                 "--val", "arditi-harmful:val,arditi-harmless:val,xstest#0.4:0.6,jbb-harmful#0.4:0.6,jbb-benign#0.4:0.6",
                 "--limit", str(b.gate_limit), "--cache", str(out / "gate-cache")]
    fit = ["policy", "fit", "--model", model, "--sae", str(sae), "--selection", str(sel), *common, *dt]
    stages.append(Stage("policy clamp", fit + ["--gate", "always", "--name", "clamp", "--out", str(pol / "clamp.json")],
                        pol / "clamp.json"))
    stages.append(Stage("policies clamp+gates", fit + ["--gate", "probe,sae,cast", "--fpr", "0.02", *gate_sets,
                                                        "--out", str(pol / "clamp+{gate}.json")],
                        pol / "clamp+cast.json"))
    stages.append(Stage(
        "compare",
        ["compare", "--model", model, "--policies", ",".join(str(pol / f"{n}.json") for n in policies),
         "--limit", str(b.eval_limit), "--capability-limit", str(b.capability_limit),
         *_capability(b, "--gsm8k-limit"), "--exclude", str(sel), "--out", str(out / "compare"), *common, *dt],
        out / "compare" / "table.md"))
    return stages


@app.command()
def demo(
    model: str = model_option(),
    out: Path = typer.Option(Path("runs/demo"), help="run folder (every stage writes below it)"),
    layer: int = typer.Option(12, help="residual-stream layer for the SAE (mid-depth of the default model)"),
    budget: str = typer.Option("small", help="small (~18 min on 2 CPU cores in bf16) or tiny (a smoke run)"),
    threads: int = typer.Option(None, help=THREADS_HELP),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    dtype: Optional[str] = DTYPE_OPT,
) -> None:
    """Run the whole pipeline on MODEL with small budgets and print the comparison table."""
    check_output_path(out)  # before any work: a bad path fails fast
    if budget not in BUDGETS:
        raise SaesteerError(f"unknown --budget {budget!r}: choose from {', '.join(BUDGETS)}")
    common = ["--device", device] + (["--threads", str(threads)] if threads else [])
    out.mkdir(parents=True, exist_ok=True)
    tfile = out / "demo_timings.json"
    try:
        before = json.loads(tfile.read_text()) if tfile.exists() else {}
    except json.JSONDecodeError:
        before = {}
    timings: dict[str, object] = {}
    from saesteer.core import resolve_dtype

    typer.echo(f"saesteer demo: {model}, budget {budget}, model dtype {resolve_dtype(dtype, device)}", err=True)
    for stage in demo_stages(model, out, layer, BUDGETS[budget], common, dtype):
        rec = _run(stage)
        old = before.get(stage.name)
        timings[stage.name] = rec or (old if isinstance(old, dict) else {"skipped": True})
        atomic_write_json(tfile, timings)
    table = out / "compare" / "table.md"
    typer.echo("\n" + table.read_text())
    typer.echo(f"comparison: {out / 'compare' / 'table.html'}")
    typer.echo(f"sweep report: {out / 'sweep' / 'report' / 'index.html'}   (stage timings: {out / 'demo_timings.json'})")
