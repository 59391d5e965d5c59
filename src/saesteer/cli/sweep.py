"""``saesteer sweep`` and ``saesteer report``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from saesteer.core import SaesteerError, check_output_path

from ._app import app
from .common import split_floats, split_ints, split_list
from .options import DEVICE_HELP, THREADS_HELP, model_option
from .presets import DTYPE_OPT


@app.command("sweep")
def sweep_cmd(
    out: Path = typer.Option(..., help="run folder (results.jsonl, conditions/, report/); re-running resumes"),
    model: str = model_option(),
    sae: Optional[Path] = typer.Option(None, help="SAE folder whose latents are clamped"),
    features_dir: Optional[Path] = typer.Option(None, help="`saesteer features` output: chosen feature, control, "
                                                "max activations, prompts to hold out"),
    feature: Optional[str] = typer.Option(None, help="feature(s) to sweep, comma-separated (default: the chosen one)"),
    clamps: str = typer.Option("0,2,4,6,8,10,12", help="absolute clamp values"),
    relative: Optional[str] = typer.Option(None, help="clamp values as multiples of the feature's max activation"),
    control: Optional[int] = typer.Option(None, help="control feature (default: from --features-dir; -1: none)"),
    control_clamps: Optional[str] = typer.Option(None, help="control clamp values (default: the clamps except 0)"),
    direction: Optional[Path] = typer.Option(None, help="refusal-direction file for the baseline"),
    alphas: str = typer.Option("1,2", help="coefficients of the added direction"),
    policy: Optional[Path] = typer.Option(None, help="policy file (`saesteer policy fit`) whose steering strength is "
                                          "swept; its fitting prompts are left out"),
    strengths: str = typer.Option("0.5,1,1.5,2", help="with --policy: multiples of the policy's steering strength"),
    unsafe: str = typer.Option("xstest-unsafe,advbench:test,jbb-harmful", help="sets where refusing is right"),
    safe: str = typer.Option("xstest-safe,jbb-benign", help="sets where refusing is wrong"),
    limit: Optional[int] = typer.Option(50, help="prompts per set (seeded)"),
    max_new_tokens: int = typer.Option(24, help="answer budget (prefix judge; rows stop once decided)"),
    capability: str = typer.Option("mmlu,truthfulqa_mc1,gsm8k", help="capability tasks per condition ('' = none; any of eval capability --tasks)"),
    cap_limit: int = typer.Option(50, help="MMLU / TruthfulQA questions per condition"),
    gsm8k_limit: int = typer.Option(20, help="questions per condition of the generative tasks (gsm8k, gsm8k_chat, humaneval)"),
    mmlu_shots: int = typer.Option(0, help="MMLU exemplars"),
    batch_size: int = typer.Option(16, help="batch size"),
    seed: int = typer.Option(0, help="seed of every subsample"),
    report: bool = typer.Option(True, help="write RUN/report/index.html at the end"),
    dtype: Optional[str] = DTYPE_OPT,
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
) -> None:
    """Clamp sweep: refusal, over-refusal and capability per condition → one results table (JSONL) + report."""
    check_output_path(out)  # before any work: a bad path fails fast
    from rich.console import Console

    from saesteer.experiments import SweepConfig, run_sweep

    if sae is not None and not sae.exists():
        raise SaesteerError(f"SAE not found: {sae}")
    cfg = SweepConfig(
        out=str(out), model=model, sae=str(sae) if sae else None, features_dir=str(features_dir) if features_dir else None,
        features=split_ints(feature, "--feature"), clamps=split_floats(clamps, "--clamps"), relative_clamps=split_floats(relative, "--relative"),
        control=control, control_clamps=split_floats(control_clamps, "--control-clamps") if control_clamps else None,
        direction=str(direction) if direction else None, alphas=split_floats(alphas, "--alphas"),
        policy=str(policy) if policy else None, strengths=split_floats(strengths, "--strengths"),
        unsafe=split_list([unsafe]), safe=split_list([safe]), refusal_limit=limit, max_new_tokens=max_new_tokens,
        capability_tasks=split_list([capability]), capability_limit=cap_limit, gsm8k_limit=gsm8k_limit,
        mmlu_shots=mmlu_shots, batch_size=batch_size, seed=seed, device=device, model_dtype=dtype or "auto",
    )
    from saesteer.core import set_threads
    from saesteer.experiments import plan_conditions

    plan_conditions(cfg)  # validate before loading the model
    set_threads(threads)
    con = Console(stderr=True)
    rows = run_sweep(cfg, on_condition=lambda c, r: con.print(
        f"[green]done[/green] {c['name']}: " + ", ".join(f"{x['metric']} {x['rate']:.2f} (n={x['n']})"
                                                         for x in r if x["group"] != "category")))
    con.print(f"{len({r['condition'] for r in rows})} conditions in {out / 'results.jsonl'}")
    if report:
        from saesteer.experiments import make_report

        con.print(f"report: {make_report(out)}")


@app.command("report")
def report_cmd(
    run_dir: Path = typer.Argument(..., help="a `saesteer sweep` run folder"),
    condition: Optional[str] = typer.Option(None, help="condition to highlight (default: best feature clamp)"),
    out: Optional[Path] = typer.Option(None, help="report folder (default: RUN_DIR/report)"),
) -> None:
    """Self-contained HTML page + PNG plots from a sweep's results.jsonl."""
    check_output_path(out)  # before any work: a bad path fails fast
    from saesteer.experiments import make_report

    print(make_report(run_dir, condition, out))
