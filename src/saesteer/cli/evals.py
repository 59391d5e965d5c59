"""``saesteer eval refusal | multiturn | judges | capability | lm-eval``: refusal and over-refusal rates, multi-turn
attacks, judge agreement, capability tasks and lm-eval-harness with the steered model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from saesteer.core import SaesteerError, check_output_path, ensure, resolve_device

from ._app import eval_app
from .common import load, print_rates, split_ints, split_list
from .options import (
    BROKEN_HELP,
    BROKEN_MAD_OPT,
    BROKEN_REPEAT_OPT,
    DEVICE_HELP,
    EVAL_STEERING,
    EXCLUDE_HELP,
    LONG_CHECK_OPT,
    LONG_TOKENS_OPT,
    THREADS_HELP,
    SteeringOptions,
    model_option,
    read_exclude,
    steering_options,
)
from .presets import DTYPE_OPT, PRESET_OPT, from_preset


@eval_app.command("refusal")
@steering_options(*EVAL_STEERING)
def refusal_cmd(
    model: str = model_option(),
    dataset: list[str] = typer.Option(["xstest"], help="prompt set(s): xstest, advbench:test, jbb-harmful, "
                                      "jbb-benign, arditi-harmful:test, a .jsonl/.csv file, hf:...; repeat or comma"),
    limit: Optional[int] = typer.Option(None, help="seeded sample of at most N prompts per dataset"),
    seed: int = typer.Option(0, help="seed of that sample"),
    out: Path = typer.Option(..., help="output folder (items.jsonl, summary.json)"),
    judge: str = typer.Option("prefix", help="prefix | model:openai:NAME | model:hf:NAME | classifier:PATH | logit:FILE.json | probe:FILE.json (eval calibrate-judge)"),
    judge_base_url: Optional[str] = typer.Option(None, help="base URL of an OpenAI-compatible judge endpoint"),
    judge_api_key_env: str = typer.Option("OPENAI_API_KEY", help="env var holding the judge endpoint's API key"),
    max_new_tokens: Optional[int] = typer.Option(None, help="answer budget (default 24 with the prefix judge, else 160)"),
    early_stop: bool = typer.Option(True, help="prefix judge: stop each answer once its verdict is known (with --broken: refusals only)"),
    batch_size: int = typer.Option(16, help="prompts decoded together"),
    system: Optional[str] = typer.Option(None, help="system prompt (default: the chat template's)"),
    exclude: Optional[Path] = typer.Option(None, help=EXCLUDE_HELP),
    broken: bool = typer.Option(False, help=BROKEN_HELP + " (steered: also generates the unsteered reference)"),
    broken_mad: float = BROKEN_MAD_OPT,
    broken_repeat: float = BROKEN_REPEAT_OPT,
    long_check: int = LONG_CHECK_OPT,
    long_tokens: int = LONG_TOKENS_OPT,
    steering: SteeringOptions = None,  # type: ignore[assignment]  (filled by @steering_options)
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    dtype: Optional[str] = DTYPE_OPT,
    preset: Optional[str] = PRESET_OPT,
) -> None:
    """Refusal rate (unsafe sets) and over-refusal rate (safe sets) with 95 % Wilson intervals."""
    check_output_path(out)  # before any work: a bad path fails fast
    from ..evals.refusal import RefusalEvalConfig, run_refusal_eval

    keys: dict[str, Any] = dict(model=model, dtype=dtype)
    if steering.feature:  # the preset's SAE and first clamp steer the given feature(s)
        keys.update(sae=steering.sae, clamp_csv=",".join(steering.clamp) or None)
    v = {"sae": steering.sae, "clamp_csv": ",".join(steering.clamp) or None, **from_preset(preset, **keys)}
    model, dtype = v["model"], v["dtype"]
    steering.sae = v["sae"]
    steering.clamp = [v["clamp_csv"]] if v["clamp_csv"] else []
    st = steering.to_steering()
    cfg = RefusalEvalConfig(
        datasets=split_list(dataset), limit=limit, seed=seed, judge=judge, judge_base_url=judge_base_url,
        judge_api_key_env=judge_api_key_env, max_new_tokens=max_new_tokens, early_stop=early_stop,
        batch_size=batch_size, system=system, exclude_ids=read_exclude(exclude), out=str(out),
        device=resolve_device(device), broken=broken, broken_mad=broken_mad, broken_repeat=broken_repeat,
        long_check=long_check, long_tokens=long_tokens,
    )
    m, tok = load(model, device, threads, dtype)
    s = run_refusal_eval(m, tok, cfg, steering=st)
    extra = f"{s['n_items']} items, generation {s['seconds_generate']:.1f} s → {out}"
    if s["n_failed"]:
        extra += f"\n[yellow]warning: the judge failed on {s['n_failed']} items (see 'error' in items.jsonl); " \
                 "rates are over the judged items[/yellow]"
    print_rates(f"refusal ({s['steering']}, judge {s['judge']})", list(s["subsets"].items()), extra)


@eval_app.command("judges")
def judges_cmd(
    judge: list[str] = typer.Option(["prefix"], help="judge(s) to score: prefix | model:openai:NAME | model:hf:NAME | "
                                    "classifier:PATH | logit:FILE.json | logit:hf:NAME | probe:FILE.json; repeat or comma"),
    labels: Optional[Path] = typer.Option(None, help="human-labelled set (default: <data root>/pyrit_refusal_eval/"
                                          "refusal_eval.jsonl; XSTest model_completions/*.csv also work)"),
    out: Optional[Path] = typer.Option(None, help="write the agreement JSON here"),
    limit: Optional[int] = typer.Option(None, help="score a seeded sample of at most N labelled rows (model judges "
                                        "are slow on CPU)"),
    seed: int = typer.Option(0, help="seed of that sample"),
    judge_base_url: Optional[str] = typer.Option(None, help="base URL of an OpenAI-compatible judge endpoint"),
    judge_api_key_env: str = typer.Option("OPENAI_API_KEY", help="env var holding the judge endpoint's API key"),
    refusal_label: Optional[str] = typer.Option(None, help="classifier judge: name or index of the refusal class"),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
) -> None:
    """Agreement of each judge with human refusal labels: accuracy (with CI), Cohen's kappa, n."""
    check_output_path(out, "file")  # before any work: a bad path fails fast
    from saesteer.core import atomic_write_json, resolve_device, set_threads

    from ..evals.judges import agreement, load_human_labels, make_judge

    set_threads(threads)
    if labels is None:
        from saesteer.data import resolve_file

        labels = resolve_file("pyrit-refusal", "pyrit_refusal_eval/refusal_eval.jsonl")
    rows = load_human_labels(labels)
    if limit is not None:
        import random

        ensure(limit >= 1, f"--limit must be ≥ 1, got {limit}")
        rows = random.Random(seed).sample(rows, min(limit, len(rows)))
    results = {}
    for spec in split_list(judge):
        j = make_judge(spec, base_url=judge_base_url, api_key_env=judge_api_key_env, device=resolve_device(device),
                       refusal_label=refusal_label)
        verdicts = j.judge([r["prompt"] for r in rows], [r["answer"] for r in rows])
        results[j.name] = agreement(verdicts, [r["is_refusal"] for r in rows])
    report = {"labels": str(labels), "n_rows": len(rows), "n_refusal": sum(r["is_refusal"] for r in rows),
              "sample": {"limit": limit, "seed": seed, "ids": [r["id"] for r in rows]} if limit else None,
              "judges": results}
    if out is not None:
        atomic_write_json(out, report)
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"judge agreement with {Path(labels).name} ({len(rows)} human labels)")
    for c in ("judge", "accuracy", "95% CI", "kappa", "n", "failed", "precision", "recall"):
        t.add_column(c)
    for nm, a in results.items():
        acc = a["accuracy"]
        t.add_row(nm, f"{acc['rate']:.3f}", f"[{acc['ci_low']:.3f}, {acc['ci_high']:.3f}]", f"{a['kappa']:.3f}",
                  str(a["n"]), str(a["n_failed"]), f"{a['precision']:.3f}", f"{a['recall']:.3f}")
    Console().print(t)



@eval_app.command("calibrate-judge")
def calibrate_judge_cmd(
    out: Path = typer.Option(..., help="write the calibration JSON here (and its plot beside it, .png); use it as the "
                             "judge `KIND:OUT` (logit:OUT or probe:OUT)"),
    kind: str = typer.Option("logit", help="logit: fit a threshold on the model's REFUSAL - COMPLIANCE log-odds; "
                             "probe: fit a logistic-regression probe on its residual stream at the judge chat's last "
                             "token (layer and regularisation chosen by cross-validation over whole prompts)"),
    model: str = typer.Option("qwen2.5-coder-0.5b-instruct", help="the judge model (built-in name, path or hub id)"),
    labels: Optional[list[Path]] = typer.Option(None, help="human-labelled set(s), repeat (default: XSTest's five "
                                                "model_completions/*.csv, data set xstest-completions)"),
    limit: Optional[int] = typer.Option(None, help="use a seeded sample of at most N labelled rows (each row is one "
                                        "forward of the judge)"),
    seed: int = typer.Option(0, help="seed of that sample and of the prompt split"),
    fit_share: float = typer.Option(0.5, help="share of the prompts whose rows fit the judge; the rest is held "
                                    "out and reported"),
    layers: Optional[str] = typer.Option(None, help="probe: candidate layers, comma-separated (default: 25, 37.5, 50, "
                                         "62.5 and 75 % of the model's depth)"),
    cuts: Optional[str] = typer.Option(None, help="probe: also fit on (and report) each answer cut to its first K "
                                       "tokens, comma-separated K (default 3,8,24: the stubs left where generation "
                                       "stopped at the prefix judge's decision; '' for none)"),
    max_answer_tokens: int = typer.Option(256, help="the judge reads at most this many tokens of each answer"),
    batch_size: int = typer.Option(16, help="answers per forward batch"),
    dtype: Optional[str] = DTYPE_OPT,
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
) -> None:
    """Fit a scoring judge (logit threshold or residual probe) on human refusal labels split by prompt, and report
    it on the held-out rows beside the prefix judge."""
    check_output_path(out, "file")
    ensure(kind in ("logit", "probe"), f"--kind must be logit or probe, got {kind!r}")
    ensure(limit is None or limit >= 2, f"--limit must be ≥ 2, got {limit}")
    ensure(0 < fit_share < 1, f"--fit-share must be in (0, 1), got {fit_share}")
    ensure(max_answer_tokens >= 1, f"--max-answer-tokens must be ≥ 1, got {max_answer_tokens}")
    ensure(layers is None or kind == "probe", "--layers is for --kind probe")
    ensure(cuts is None or kind == "probe", "--cuts is for --kind probe")
    layer_list = split_ints(layers, "--layers") if layers else None
    cut_list = split_ints("3,8,24" if cuts is None else cuts, "--cuts")
    ensure(all(k >= 1 for k in cut_list), f"--cuts must be positive token counts, got {cuts!r}")
    import time

    from saesteer.core import atomic_write_json, set_threads
    from saesteer.data import get_set, resolve_file
    from saesteer.models import load_model

    from ..evals import logitjudge, probejudge
    from ..evals.calibration import calibration_plot
    from ..evals.judges import PrefixJudge, load_human_labels

    set_threads(threads)
    paths = list(labels) if labels else [resolve_file("xstest-completions", f.path)
                                         for f in get_set("xstest-completions").files]
    rows = [r for p in paths for r in load_human_labels(p)]
    if limit is not None and limit < len(rows):
        import random

        rows = random.Random(seed).sample(rows, limit)
    m, tok = load_model(model, device=resolve_device(device), dtype=dtype)
    t0 = time.perf_counter()
    if kind == "logit":
        judge = logitjudge.LogitJudge(m, tok, max_answer_tokens=max_answer_tokens, batch_size=batch_size)
        report = logitjudge.calibrate(judge, rows, seed=seed, fit_share=fit_share, baselines=[PrefixJudge()], say=print)
    else:  # (probejudge checks each layer against the model before any forward)
        judge, report = probejudge.calibrate(m, tok, rows, layers=layer_list, seed=seed, fit_share=fit_share,
                                             max_answer_tokens=max_answer_tokens, batch_size=batch_size,
                                             cuts=cut_list, baselines=[PrefixJudge()], say=print)
    report["labels_files"] = [str(p) for p in paths]
    report["sample"] = {"limit": limit, "n_rows": len(rows)}
    report["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(out, report)
    png = calibration_plot(report, out.with_suffix(".png"))
    from rich.console import Console
    from rich.table import Table

    h = report["held_out"]
    what = f"layer {report['layer']}, " if kind == "probe" else ""
    t = Table(title=f"{judge.model_name} on {h['n']} held-out labelled answers ({h['n_refusal']} refusals); "
                    f"{kind} judge ({what}threshold {report['threshold']:+.3f}) fitted on {report['fit']['n']}")
    for c in ("judge", "accuracy", "95% CI", "balanced acc.", "kappa", "AUC", "precision", "recall"):
        t.add_column(c)
    stub_rows = [(f"{nm}, answers cut to {k} tokens", a) for k, c in report.get("held_out_cuts", {}).items()
                for nm, a in [(kind, c["calibrated"]), *c["baselines"].items()]]
    for nm, a in [(f"{kind}, calibrated ({report['threshold']:+.3f})", h["calibrated"]),
                  (f"{kind}, threshold 0", h["uncalibrated"]), *h["baselines"].items(), *stub_rows]:
        acc = a["accuracy"]
        t.add_row(nm, f"{acc['rate']:.3f}", f"[{acc['ci_low']:.3f}, {acc['ci_high']:.3f}]",
                  f"{a['balanced_accuracy']:.3f}", f"{a['kappa']:.3f}", f"{a['auc']:.3f}" if "auc" in a else "–",
                  f"{a['precision']:.3f}", f"{a['recall']:.3f}")
    Console().print(t)
    print(f"wrote {out} and {png}; judge spec: {kind}:{out}")


@eval_app.command("multiturn")
@steering_options(*EVAL_STEERING)
def multiturn_cmd(
    model: str = model_option(),
    mode: str = typer.Option("replay", help="replay (fixed human turns, refusal per turn) or crescendo (attacker)"),
    dataset: Optional[str] = typer.Option(None, help="replay: conversations (default hh-harmless); crescendo: "
                                          "objectives (default jbb-harmful)"),
    limit: Optional[int] = typer.Option(20, help="seeded sample of at most N conversations / objectives"),
    seed: int = typer.Option(0, help="seed of that sample"),
    max_turns: int = typer.Option(5, help="human turns replayed / attacker turns per objective"),
    min_turns: int = typer.Option(2, help="replay: only conversations with at least this many human turns"),
    max_new_tokens: int = typer.Option(48, help="target answer budget per turn"),
    batch_size: int = typer.Option(16, help="target rows decoded together"),
    out: Path = typer.Option(..., help="output folder (items.jsonl, summary.json)"),
    judge: str = typer.Option("prefix", help="refusal judge (per turn / for backtracking)"),
    attacker: str = typer.Option("hf:qwen2.5-coder-1.5b-instruct", help="crescendo attacker: hf:MODEL or openai:NAME"),
    attacker_base_url: Optional[str] = typer.Option(None, help="base URL of an OpenAI-compatible attacker endpoint"),
    api_key_env: str = typer.Option("OPENAI_API_KEY", help="env var with the endpoint's API key"),
    success_judge: Optional[str] = typer.Option(None, help="success judge backend (default: the attacker)"),
    max_backtracks: int = typer.Option(3, help="crescendo: refused turns the attacker may retract"),
    system: Optional[str] = typer.Option(None, help="target system prompt (default: the chat template's)"),
    steering: SteeringOptions = None,  # type: ignore[assignment]  (filled by @steering_options)
    dtype: Optional[str] = DTYPE_OPT,
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
) -> None:
    """Multi-turn refusal: replay red-team conversations turn by turn, or run Crescendo-style attacks (ASR)."""
    check_output_path(out)  # before any work: a bad path fails fast
    from ..evals.multiturn import MultiTurnConfig, run_crescendo, run_replay

    ensure(mode in ("replay", "crescendo"), f"--mode must be replay or crescendo, got {mode!r}")
    st = steering.to_steering()
    cfg = MultiTurnConfig(
        mode=mode, dataset=dataset, limit=limit, seed=seed, max_turns=max_turns, min_turns=min_turns,
        max_new_tokens=max_new_tokens, batch_size=batch_size, system=system, judge=judge, attacker=attacker,
        attacker_base_url=attacker_base_url, api_key_env=api_key_env, success_judge=success_judge,
        max_backtracks=max_backtracks, out=str(out), device=resolve_device(device),
    )
    m, tok = load(model, device, threads, dtype)
    if mode == "replay":
        s = run_replay(m, tok, cfg, steering=st)
        rows = [(f"turn {t}", r) for t, r in s["per_turn"].items()]
        rows += [(f"refused by turn {t}", r) for t, r in s["cumulative"].items()]
        print_rates(f"multi-turn replay ({s['steering']}, {s['n_conversations']} conversations)", rows, f"→ {out}")
    else:
        s = run_crescendo(m, tok, cfg, steering=st)
        print_rates(f"crescendo ASR ({s['steering']}, attacker {s['attacker']})",
                     [("attack success", {**s["asr"], "n_failed": s["n_failed"]})],
                     f"mean turns {s['mean_turns']:.2f}, mean backtracks {s['mean_backtracks']:.2f} → {out}")


@eval_app.command("capability")
@steering_options(*EVAL_STEERING)
def capability_cmd(
    model: str = model_option(),
    tasks: str = typer.Option("mmlu,truthfulqa_mc1", help="comma-separated: mmlu, truthfulqa_mc1, truthfulqa_mc2, "
                              "gsm8k (harness formats); mmlu_chat, gsm8k_chat, humaneval (chat formats)"),
    limit: Optional[int] = typer.Option(100, help="questions per task (seeded subsample; MMLU stratified by subject)"),
    mmlu_shots: int = typer.Option(0, help="MMLU exemplars from the dev split (harness format)"),
    gsm8k_shots: int = typer.Option(4, help="GSM8K exemplars from the train split"),
    gsm8k_max_new_tokens: int = typer.Option(192, help="greedy tokens per GSM8K answer"),
    gsm8k_chat_max_new_tokens: int = typer.Option(384, help="greedy tokens per gsm8k_chat reply"),
    humaneval_max_new_tokens: int = typer.Option(512, help="greedy tokens per HumanEval reply"),
    humaneval_timeout: float = typer.Option(10.0, help="seconds per HumanEval program in the sandbox"),
    batch_size: int = typer.Option(8, help="sequences per forward / generation batch"),
    seed: int = typer.Option(0, help="seed of the subsamples"),
    data_root: Optional[Path] = typer.Option(None, help="folder with mmlu/, truthfulqa/, gsm8k/ (default: data root)"),
    out: Optional[Path] = typer.Option(None, help="write summary.json + items.jsonl here"),
    steering: SteeringOptions = None,  # type: ignore[assignment]  (filled by @steering_options)
    dtype: Optional[str] = DTYPE_OPT,
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
) -> None:
    """MMLU, TruthfulQA MC1/MC2 and GSM8K in lm-eval's formats; MMLU, GSM8K (0-shot) and HumanEval (pass@1, code
    run in a sandbox) in chat format; steered or not, with 95 % intervals."""
    check_output_path(out)  # before any work: a bad path fails fast
    from ..evals.capability import PUBLISHED, TASKS, CapabilityConfig, run_capability, write_capability

    st = steering.to_steering()
    cfg = CapabilityConfig(tasks=tuple(split_list([tasks])), limit=limit, mmlu_shots=mmlu_shots,
                           gsm8k_shots=gsm8k_shots, gsm8k_max_new_tokens=gsm8k_max_new_tokens, batch_size=batch_size,
                           gsm8k_chat_max_new_tokens=gsm8k_chat_max_new_tokens,
                           humaneval_max_new_tokens=humaneval_max_new_tokens, humaneval_timeout=humaneval_timeout,
                           seed=seed, data_root=str(data_root) if data_root else None)
    unknown = [t for t in cfg.tasks if t not in TASKS]
    ensure(not unknown, f"unknown capability task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    ensure(humaneval_timeout > 0, f"--humaneval-timeout must be positive, got {humaneval_timeout}")
    if data_root is not None and not data_root.is_dir():
        raise SaesteerError(f"data root not found: {data_root}")
    m, tok = load(model, device, threads, dtype)
    summ, items = run_capability(m, tok, cfg, steering=st)
    label = st.name if st is not None else "unsteered"
    published = {k: v for k, v in PUBLISHED.get(model, {}).items() if k in summ}
    if out is not None:
        write_capability(out, cfg, summ, items, {"model": model, "steering": label, "published": published})
    rows = [(k, v) for k, v in summ.items() if "/" not in k]
    note = "".join(f"published unsteered {k} of {model}: {v:.3f} (Qwen2.5-Coder report, its own harness)\n"
                   for k, v in published.items())
    print_rates(f"capability ({label})", rows, note + (f"→ {out}" if out else ""))


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
