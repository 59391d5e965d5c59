"""``saesteer policy fit | show`` and ``saesteer compare``: conditional steering policies and their comparison."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional

import typer

from saesteer.core import check_output_path, ensure

from ._app import app
from .common import load, split_floats, split_list
from .options import (
    BROKEN_HELP,
    BROKEN_MAD_OPT,
    BROKEN_REPEAT_OPT,
    DEVICE_HELP,
    EXCLUDE_HELP,
    LONG_CHECK_OPT,
    LONG_TOKENS_OPT,
    THREADS_HELP,
    SteeringOptions,
    model_option,
    read_exclude,
    steering_options,
)
from .presets import DTYPE_OPT

policy_app = typer.Typer(help="Conditional steering policies: a gate + threshold + steering config in one file.",
                         no_args_is_help=True)
app.add_typer(policy_app, name="policy")


def _abs(p: Optional[str]) -> Optional[str]:
    return str(Path(p).expanduser().resolve()) if p else p


def _specs(steering: SteeringOptions, selection: Optional[Path], required: bool = True) -> list:
    """The policy's own steering: the steering options, with feature / clamp from a features ``selection.json``
    (``required`` False: none is fine — a system-prompt or low-side-only policy)."""
    from saesteer.core import read_json

    if selection is not None:
        sel = read_json(selection, "feature selection")
        ensure(isinstance(sel, dict) and "feature" in sel and "clamp" in sel,
               f"{selection}: no chosen feature/clamp (run `saesteer features` with its grid search)")
        steering.feature = steering.feature or [str(int(sel["feature"]))]
        steering.clamp = steering.clamp or [str(float(sel["clamp"]))]
    specs = steering.specs()
    ensure(len(specs) > 0 or not required, "no steering given: use --sae/--feature/--clamp, --selection, --direction, "
           "--spec, --steer-low or --system-prompt")
    return _absolute(specs)


def _absolute(specs: list) -> list:
    for s in specs:  # policies are used from other folders: store absolute paths
        s.sae, s.direction = _abs(s.sae), _abs(s.direction)
    return specs


@policy_app.command("fit")
@steering_options("sae", "feature", "clamp", "alpha", "direction", "spec")
def fit_cmd(
    out: Path = typer.Option(..., help="policy file to write (JSON)"),
    model: str = model_option(),
    steering: SteeringOptions = None,  # type: ignore[assignment]  (the policy's steering; @steering_options)
    selection: Optional[Path] = typer.Option(None, help="selection.json of `saesteer features` (feature + clamp)"),
    gate: str = typer.Option("probe", help="sae | probe | cast | always (unconditional); several comma-separated "
                              "share one residual collection (then --out needs {gate})"),
    gate_layer: Optional[int] = typer.Option(None, help="layer the gate reads (default: the steering layer)"),
    gate_sae: Optional[Path] = typer.Option(None, help="SAE for an sae gate (default: the steering SAE)"),
    gate_model: Optional[str] = typer.Option(None, help="read the gate from this model's residual stream instead "
                                             "(same tokenizer, e.g. qwen2.5-coder-1.5b-instruct; needs --gate-layer)"),
    positions: Optional[int] = typer.Option(None, help="trailing prompt tokens read (default: the template's "
                                            "post-instruction tokens)"),
    reduce: str = typer.Option("mean", help="pool the positions: mean | last"),
    fpr: float = typer.Option(0.02, help="false-positive rate cap on the benign validation prompts"),
    fpr_cap: str = typer.Option("pooled", help="pooled: the cap holds over all benign val prompts; per-set: on each "
                                "benign val set separately"),
    strength: str = typer.Option("hard", help="hard | linear | sigmoid (strength grows with the gate score)"),
    train: List[str] = typer.Option(["arditi-harmful:train,arditi-harmless:train"], help="gate training sets "
                                    "(a trailing @W weights a set in a probe's fit, e.g. jbb-benign#0:0.4@4)"),
    val: List[str] = typer.Option(["arditi-harmful:val,arditi-harmless:val"], help="threshold sets (FPR cap)"),
    heldout: List[str] = typer.Option([], help="held-out sets to report fire rates on (e.g. xstest:safe)"),
    limit: Optional[int] = typer.Option(256, help="seeded sample per set (0 = all)"),
    top_m: int = typer.Option(16, help="sae gate: latents combined"),
    c: Optional[float] = typer.Option(None, "--C", help="inverse L2 strength of the logistic regression"),
    batch_size: int = typer.Option(16, help="prompts per forward"),
    cache: Optional[Path] = typer.Option(None, help="folder caching the gate inputs (refits skip the forwards)"),
    name: Optional[str] = typer.Option(None, help="policy name in comparison tables (default: the file stem)"),
    seed: int = typer.Option(0, help="seed of the subsamples"),
    gate_suffix: str = typer.Option("", help="text the gate reads after each prompt (a prompted probe), e.g. "
                                     "'Before answering, I judge whether this request is harmful or harmless. "
                                     "Verdict: the request is'; generation never sees it"),
    gate_read: str = typer.Option("last", help="what the gate reads of a conversation: last (the tokens after the "
                                  "last user message) | turns (the highest score over every user turn's) | windows (turns, and "
                                  "windows of every long user message each read as its own request)"),
    gate_window: int = typer.Option(96, help="--gate-read windows: window length in tokens"),
    gate_window_stride: int = typer.Option(48, help="--gate-read windows: tokens between window starts"),
    gate_window_split: str = typer.Option("fixed", help="--gate-read windows: fixed (windows over each long message) | "
                                          "paragraphs (each paragraph read as its own request, long ones windowed)"),
    chat_only: bool = typer.Option(True, "--chat-only/--any-text", help="never steer prompts that do not end with the "
                                   "chat template's post-instruction tokens (raw text the gate was not fitted on)"),
    system_prompt: Optional[str] = typer.Option(None, help="a fixed system prompt the policy puts first in every chat "
                                                "prompt; 'safety' = saesteer's SAFETY_SYSTEM_PROMPT (the system-prompt "
                                                "baseline: --gate always with no steering)"),
    steer_low: Optional[Path] = typer.Option(None, help="two-sided policy: steering spec JSON applied to prompts the "
                                             "gate scores below its low threshold (e.g. an ablate_direction spec)"),
    low_rate: float = typer.Option(0.02, help="two-sided policy: largest share of harmful val prompts steered low "
                                   "(sets the low threshold)"),
    match: Optional[str] = typer.Option(None, help="match the steering strength to a validation unsafe refusal: a "
                                        "policy file (e.g. the unconditional clamp) or a rate in [0, 1]; searched on "
                                        "the harmful --val prompts only"),
    match_strengths: str = typer.Option("0.25,0.5,0.75,1,1.5,2,3,4,6,8", help="multipliers of the steering strength "
                                        "tried by --match (for an add of alpha 1: the alphas)"),
    dtype: Optional[str] = DTYPE_OPT,
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
) -> None:
    """Fit a gate on train prompts, cap its false positives on validation prompts, save gate + steering as one file."""
    check_output_path(out, "file")  # before any work: a bad path fails fast
    import dataclasses

    from saesteer.gating import PolicyFitConfig, fit_policy, policy_summary
    from saesteer.steering import load_specs

    low = _absolute(load_specs(steer_low)) if steer_low is not None else []
    specs = _specs(steering, selection, required=not (low or (system_prompt or "").strip()))
    ensure(0.0 <= fpr <= 1.0, f"--fpr must be in [0, 1], got {fpr}")
    from saesteer.gating.windows import SPLITS

    ensure(gate_window_split in SPLITS, f"--gate-window-split must be one of {', '.join(SPLITS)}, got {gate_window_split!r}")
    if match is not None:
        try:
            ensure(0.0 <= float(match) <= 1.0, f"--match must be a policy file or a rate in [0, 1], got {match}")
        except ValueError:
            ensure(Path(match).exists(), f"--match policy file not found: {match}")
    kinds = split_list([gate])
    ensure(len(kinds) > 0, "--gate is empty")
    ensure(len(kinds) == 1 or "{gate}" in str(out), "several gates need --out with a {gate} placeholder, "
           "e.g. --out runs/policy-{gate}.json")
    cfg = PolicyFitConfig(steering=specs, gate=kinds[0], layer=gate_layer, positions=positions, reduce=reduce, fpr=fpr,
                          fpr_cap=fpr_cap,
                          strength=strength, train=split_list(train), val=split_list(val), heldout=split_list(heldout),
                          limit=limit or None, top_m=top_m, C=c, sae=_abs(str(gate_sae)) if gate_sae else None,
                          batch_size=batch_size, cache=str(cache) if cache else None, name=name or "", seed=seed,
                          gate_model=gate_model, chat_only=chat_only, gate_suffix=gate_suffix, read=gate_read,
                          window=gate_window, window_stride=gate_window_stride, window_split=gate_window_split,
                          system=system_prompt, steering_low=low, low_rate=low_rate, match=match,
                          match_strengths=split_floats(match_strengths, "--match-strengths"))
    m, tok = load(model, device, threads, dtype)
    from saesteer.evals import refusal_rate

    def rate(pol: Any, prompts: list) -> dict:  # the judge of --match: generation + prefix judge, batched
        return refusal_rate(m, tok, pol, prompts, batch_size=batch_size)

    shared: dict = {}  # residuals collected once, shared by every gate kind
    for kind in kinds:
        path = Path(str(out).replace("{gate}", kind))
        kcfg = dataclasses.replace(cfg, gate=kind, name=(name or path.stem).replace("{gate}", kind))
        pol = fit_policy(m, tok, kcfg, residuals=shared, refusal_rate=rate)
        pol.save(path)
        _print_summary(policy_summary(pol))
        typer.echo(f"wrote {path}")


def _print_summary(s: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"policy {s.get('name')}", show_header=False)
    for k, v in s.items():
        t.add_row(k, v if isinstance(v, str) else json.dumps(v, default=str))
    Console().print(t)


@policy_app.command("show")
def show_cmd(
    path: Path = typer.Argument(..., help="policy file"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Print a policy's gate, threshold, steering and validation statistics."""
    from saesteer.gating import load_policy, policy_summary

    s = policy_summary(load_policy(path))
    if as_json:
        typer.echo(json.dumps(s, indent=2, default=str))
    else:
        _print_summary(s)


@app.command("compare")
def compare_cmd(
    out: Path = typer.Option(..., help="output folder (results.jsonl, table.md, table.html, pareto.png)"),
    policies: List[str] = typer.Option([], help="policy files, comma-separated or repeated"),
    model: str = model_option(),
    unsteered: bool = typer.Option(True, help="include the unsteered model"),
    unsafe: List[str] = typer.Option(["xstest:unsafe,advbench:test,jbb-harmful"], help="harmful prompt sets"),
    safe: List[str] = typer.Option(["xstest:safe,jbb-benign"], help="safe prompt sets (over-refusal)"),
    limit: Optional[int] = typer.Option(50, help="prompts per refusal set (0 = all)"),
    max_new_tokens: Optional[int] = typer.Option(None, help="answer budget (default: the judge's)"),
    judge: str = typer.Option("prefix", help="refusal judge"),
    judges: List[str] = typer.Option([], help="further judges of the very same stored answers (e.g. probe:FILE.json,model:hf:NAME; "
                                     "fit probe / logit judges with eval calibrate-judge): refusal %, Cohen's kappa and agreement with --judge per set"),
    judges_limit: Optional[int] = typer.Option(None, help="further judges read a seeded sample of at most N answers per "
                                               "set and condition (0 / unset = all)"),
    broken: bool = typer.Option(True, help=BROKEN_HELP),
    broken_mad: float = BROKEN_MAD_OPT,
    broken_repeat: float = BROKEN_REPEAT_OPT,
    long_check: int = LONG_CHECK_OPT,
    long_tokens: int = LONG_TOKENS_OPT,
    multiturn: bool = typer.Option(True, help="run the multi-turn replay eval"),
    multiturn_limit: Optional[int] = typer.Option(20, help="conversations replayed"),
    max_turns: int = typer.Option(3, help="turns per conversation"),
    capability: List[str] = typer.Option(["mmlu,truthfulqa_mc1,gsm8k"], help="capability tasks ('' = none; any of eval capability --tasks, e.g. humaneval,gsm8k_chat,mmlu_chat)"),
    capability_limit: Optional[int] = typer.Option(100, help="questions per MMLU / TruthfulQA task"),
    gsm8k_limit: Optional[int] = typer.Option(30, help="questions of the generative tasks (gsm8k, gsm8k_chat, humaneval)"),
    exclude: Optional[Path] = typer.Option(None, help=EXCLUDE_HELP),
    batch_size: int = typer.Option(16, help="prompts per batch"),
    seed: int = typer.Option(0, help="seed of every subsample"),
    reuse_unsteered: bool = typer.Option(True, help="gated policies take the unsteered condition's answer for every "
                                         "row their gate leaves untouched instead of regenerating it"),
    dtype: Optional[str] = DTYPE_OPT,
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
) -> None:
    """Unsteered vs each policy on unsafe refusal, over-refusal, multi-turn and capability; table + Pareto plot."""
    check_output_path(out)  # before any work: a bad path fails fast
    from saesteer.experiments import CompareConfig, run_compare

    pols = split_list(policies)
    for p in pols:
        ensure(Path(p).exists(), f"policy file not found: {p}")
    cfg = CompareConfig(policies=pols, out=str(out), unsteered=unsteered, unsafe=split_list(unsafe), safe=split_list(safe),
                        limit=limit or None, max_new_tokens=max_new_tokens, judge=judge, multiturn=multiturn,
                        multiturn_limit=multiturn_limit or None, max_turns=max_turns, capability=split_list(capability),
                        capability_limit=capability_limit or None, gsm8k_limit=gsm8k_limit or None,
                        exclude_ids=read_exclude(exclude), batch_size=batch_size, seed=seed, judges=split_list(judges),
                        judges_limit=judges_limit or None, broken=broken, broken_mad=broken_mad, broken_repeat=broken_repeat, long_check=long_check,
                        long_tokens=long_tokens, reuse_unsteered=reuse_unsteered)
    from saesteer.experiments import policy_conditions

    policy_conditions(cfg)  # validate every policy file before loading the model
    m, tok = load(model, device, threads, dtype)
    run_compare(m, tok, cfg, say=lambda s: typer.echo(s, err=True))
    typer.echo((out / "table.md").read_text())
    typer.echo(f"wrote {out}/table.md, table.html, pareto.png, goals.json, results.jsonl")
