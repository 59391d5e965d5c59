"""``saesteer eval capability``, ``saesteer eval lm-eval``, ``saesteer sweep`` and ``saesteer report``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from saesteer.core import SaesteerError, check_output_path

from ._app import DEVICE_HELP, MODEL_HELP, THREADS_HELP, app, eval_app
from .evals import (
    ALPHA_OPT,
    CLAMP_OPT,
    DIRECTION_OPT,
    FEATURE_OPT,
    NAME_OPT,
    POLICY_OPT,
    SAE_OPT,
    SPEC_OPT,
    _load,
    _print_rates,
    _split_list,
    steering_from_options,
)


def _floats(s: Optional[str], what: str) -> list[float]:
    if s is None or not s.strip():
        return []
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise SaesteerError(f"{what} must be comma-separated numbers, got {s!r}") from None


def _ints(s: Optional[str], what: str) -> list[int]:
    if s is None or not s.strip():
        return []
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise SaesteerError(f"{what} must be comma-separated integers, got {s!r}") from None


@eval_app.command("capability")
def capability_cmd(
    model: str = typer.Option("qwen2.5-coder-0.5b-instruct", help=MODEL_HELP),
    tasks: str = typer.Option("mmlu,truthfulqa_mc1", help="comma-separated: mmlu, truthfulqa_mc1, truthfulqa_mc2, gsm8k"),
    limit: Optional[int] = typer.Option(100, help="questions per task (seeded subsample; MMLU stratified by subject)"),
    mmlu_shots: int = typer.Option(0, help="MMLU exemplars from the dev split (harness format)"),
    gsm8k_shots: int = typer.Option(4, help="GSM8K exemplars from the train split"),
    gsm8k_max_new_tokens: int = typer.Option(192, help="greedy tokens per GSM8K answer"),
    batch_size: int = typer.Option(8, help="sequences per forward / generation batch"),
    seed: int = typer.Option(0, help="seed of the subsamples"),
    data_root: Optional[Path] = typer.Option(None, help="folder with mmlu/, truthfulqa/, gsm8k/ (default: data root)"),
    out: Optional[Path] = typer.Option(None, help="write summary.json + items.jsonl here"),
    sae: Optional[Path] = SAE_OPT, feature: Optional[str] = FEATURE_OPT, clamp: Optional[str] = CLAMP_OPT,
    direction: Optional[Path] = DIRECTION_OPT, alpha: float = ALPHA_OPT, spec: Optional[Path] = SPEC_OPT,
    policy: Optional[Path] = POLICY_OPT, name: Optional[str] = NAME_OPT,
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
) -> None:
    """MMLU, TruthfulQA MC1/MC2 and GSM8K in lm-eval's formats, steered or not, with 95 % intervals."""
    check_output_path(out)  # before any work: a bad path fails fast
    from ..evals.capability import CapabilityConfig, run_capability, write_capability

    steering = steering_from_options(sae, feature, clamp, direction, alpha, spec, policy, name)
    cfg = CapabilityConfig(tasks=tuple(_split_list([tasks])), limit=limit, mmlu_shots=mmlu_shots,
                           gsm8k_shots=gsm8k_shots, gsm8k_max_new_tokens=gsm8k_max_new_tokens, batch_size=batch_size,
                           seed=seed, data_root=str(data_root) if data_root else None)
    if data_root is not None and not data_root.is_dir():
        raise SaesteerError(f"data root not found: {data_root}")
    m, tok = _load(model, device, threads)
    summ, items = run_capability(m, tok, cfg, steering=steering)
    label = steering.name if steering is not None else "unsteered"
    if out is not None:
        write_capability(out, cfg, summ, items, {"model": model, "steering": label})
    rows = [(k, v) for k, v in summ.items() if "/" not in k]
    _print_rates(f"capability ({label})", rows, f"→ {out}" if out else "")


@eval_app.command("lm-eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
                  add_help_option=False)
def lmeval_cmd(ctx: typer.Context) -> None:
    """lm-evaluation-harness's CLI with the `saesteer` model registered (all lm_eval options pass through), e.g.
    `saesteer eval lm-eval run --model saesteer --model_args pretrained=M,sae=S,feature=F,clamp=C --tasks T`."""
    try:
        from ..evals.lmeval import main
    except ImportError as e:
        raise SaesteerError(f"lm-eval is not installed ({e}); pip install 'lm-eval[hf]'") from None
    try:
        main(list(ctx.args))
    except SystemExit as e:
        if e.code not in (0, None):
            raise


@app.command("sweep")
def sweep_cmd(
    out: Path = typer.Option(..., help="run folder (results.jsonl, conditions/, report/); re-running resumes"),
    model: str = typer.Option("qwen2.5-coder-0.5b-instruct", help=MODEL_HELP),
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
    unsafe: str = typer.Option("xstest-unsafe,advbench:test,jbb-harmful", help="sets where refusing is right"),
    safe: str = typer.Option("xstest-safe,jbb-benign", help="sets where refusing is wrong"),
    limit: Optional[int] = typer.Option(50, help="prompts per set (seeded)"),
    max_new_tokens: int = typer.Option(24, help="answer budget (prefix judge; rows stop once decided)"),
    capability: str = typer.Option("mmlu,truthfulqa_mc1,gsm8k", help="capability tasks per condition ('' = none)"),
    cap_limit: int = typer.Option(50, help="MMLU / TruthfulQA questions per condition"),
    gsm8k_limit: int = typer.Option(20, help="GSM8K questions per condition"),
    mmlu_shots: int = typer.Option(0, help="MMLU exemplars"),
    batch_size: int = typer.Option(16, help="batch size"),
    seed: int = typer.Option(0, help="seed of every subsample"),
    report: bool = typer.Option(True, help="write RUN/report/index.html at the end"),
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
        features=_ints(feature, "--feature"), clamps=_floats(clamps, "--clamps"), relative_clamps=_floats(relative, "--relative"),
        control=control, control_clamps=_floats(control_clamps, "--control-clamps") if control_clamps else None,
        direction=str(direction) if direction else None, alphas=_floats(alphas, "--alphas"),
        unsafe=_split_list([unsafe]), safe=_split_list([safe]), refusal_limit=limit, max_new_tokens=max_new_tokens,
        capability_tasks=_split_list([capability]), capability_limit=cap_limit, gsm8k_limit=gsm8k_limit,
        mmlu_shots=mmlu_shots, batch_size=batch_size, seed=seed, device=device,
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
