"""``saesteer eval refusal | multiturn | judges``: refusal and over-refusal rates, multi-turn attacks, judge agreement."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from saesteer.core import SaesteerError, ensure

from ._app import DEVICE_HELP, MODEL_HELP, THREADS_HELP, eval_app
from .presets import DTYPE_OPT, PRESET_OPT, from_preset, model_dtype

_ST = "steering"


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return typer.Option(default, help=help, rich_help_panel=kw.pop("panel", None), **kw)


# Steering options shared by the eval commands.
SAE_OPT = _opt(None, "SAE folder (any format) whose feature(s) to clamp", panel=_ST)
FEATURE_OPT = _opt(None, "SAE latent index, or several comma-separated", panel=_ST)
CLAMP_OPT = _opt(None, "clamp value(s) in the SAE's latent units (one, or one per feature)", panel=_ST)
DIRECTION_OPT = _opt(None, "refusal-direction file to add (saesteer direction)", panel=_ST)
ALPHA_OPT = _opt(1.0, "coefficient of the added direction", panel=_ST)
SPEC_OPT = _opt(None, "steering spec JSON (one spec, a list, or {\"steering\": [...]})", panel=_ST)
POLICY_OPT = _opt(None, "conditional steering policy file (saesteer policy fit)", panel=_ST)
NAME_OPT = _opt(None, "name recorded for this steering config (default: derived from the options)", panel=_ST)


def steering_from_options(
    sae: Optional[Path], feature: Optional[str], clamp: Optional[str], direction: Optional[Path], alpha: float,
    spec: Optional[Path], policy: Optional[Path], name: Optional[str] = None,
) -> Any:
    """Build a :class:`saesteer.evals.refusal.Steering` from the CLI's steering options (None = unsteered)."""
    from ..evals.refusal import Steering, spec_name
    from .steer import steering_specs

    try:
        feats = [int(f) for f in str(feature).split(",") if f.strip()] if feature is not None else []
        vals = [float(v) for v in str(clamp).split(",") if v.strip()] if clamp is not None else []
    except ValueError:
        raise SaesteerError(f"--feature must be integers and --clamp numbers (got {feature!r}, {clamp!r})") from None
    if sae is not None:
        from saesteer.sae.archs.hookpoints import sae_path_exists

        ensure(sae_path_exists(sae), f"SAE not found: {sae}")
        ensure(bool(feats) and bool(vals), "SAE steering needs --sae, --feature and --clamp")
        ensure(len(vals) in (1, len(feats)), f"{len(feats)} features but {len(vals)} clamp values")
    if direction is not None:
        ensure(Path(direction).exists(), f"direction file not found: {direction}")
    specs = steering_specs(sae=sae, feature=feats, clamp=vals, alpha=alpha, direction=direction, spec=spec)
    pol = None
    if policy is not None:
        ensure(Path(policy).exists(), f"policy file not found: {policy}")
        try:
            from saesteer.gating import load_policy
        except ImportError:
            raise SaesteerError("--policy needs saesteer.gating.policy, which is not installed in this version") from None
        pol = load_policy(policy)
    if not specs and pol is None:
        return None
    parts = [spec_name(s) for s in specs] + ([f"policy {Path(policy).stem}"] if pol is not None else [])
    return Steering(name=name or " + ".join(parts), specs=specs, policy=pol)


def _load(model: str, device: str, threads: Optional[int], dtype: Optional[str] = None) -> tuple[Any, Any]:
    from saesteer.core import resolve_device, set_threads
    from saesteer.models import load_model

    set_threads(threads)
    return load_model(model, device=resolve_device(device), dtype=model_dtype(dtype))


def _device(device: str) -> str:
    from saesteer.core import resolve_device

    return resolve_device(device)


def _split_list(values: list[str]) -> list[str]:
    return [v.strip() for x in values for v in x.split(",") if v.strip()]


def _print_rates(title: str, rows: list[tuple[str, dict]], extra: str = "") -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for c in ("set", "rate", "k / n", "95% CI", "failed"):
        t.add_column(c)
    for name, r in rows:
        t.add_row(name, f"{r['rate']:.3f}", f"{r['k']} / {r['n']}", f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]",
                  str(r.get("n_failed", 0)))
    con = Console()
    con.print(t)
    if extra:
        con.print(extra)


@eval_app.command("refusal")
def refusal_cmd(
    model: str = typer.Option("qwen2.5-coder-0.5b-instruct", help=MODEL_HELP),
    dataset: list[str] = typer.Option(["xstest"], help="prompt set(s): xstest, advbench:test, jbb-harmful, "
                                      "jbb-benign, arditi-harmful:test, a .jsonl/.csv file, hf:...; repeat or comma"),
    limit: Optional[int] = typer.Option(None, help="seeded sample of at most N prompts per dataset"),
    seed: int = typer.Option(0, help="seed of that sample"),
    out: Path = typer.Option(..., help="output folder (items.jsonl, summary.json)"),
    judge: str = typer.Option("prefix", help="prefix | model:openai:NAME | model:hf:NAME | classifier:PATH"),
    judge_base_url: Optional[str] = typer.Option(None, help="base URL of an OpenAI-compatible judge endpoint"),
    judge_api_key_env: str = typer.Option("OPENAI_API_KEY", help="env var holding the judge endpoint's API key"),
    max_new_tokens: Optional[int] = typer.Option(None, help="answer budget (default 24 with the prefix judge, else 160)"),
    early_stop: bool = typer.Option(True, help="prefix judge: stop each answer once its verdict is known"),
    batch_size: int = typer.Option(16, help="prompts decoded together"),
    system: Optional[str] = typer.Option(None, help="system prompt (default: the chat template's)"),
    exclude: Optional[Path] = typer.Option(None, help="JSON list of item ids to leave out (e.g. used for discovery)"),
    sae: Optional[Path] = SAE_OPT, feature: Optional[str] = FEATURE_OPT, clamp: Optional[str] = CLAMP_OPT,
    direction: Optional[Path] = DIRECTION_OPT, alpha: float = ALPHA_OPT, spec: Optional[Path] = SPEC_OPT,
    policy: Optional[Path] = POLICY_OPT, name: Optional[str] = NAME_OPT,
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    dtype: Optional[str] = DTYPE_OPT,
    preset: Optional[str] = PRESET_OPT,
) -> None:
    """Refusal rate (unsafe sets) and over-refusal rate (safe sets) with 95 % Wilson intervals."""
    from ..evals.refusal import RefusalEvalConfig, run_refusal_eval

    keys: dict[str, Any] = dict(model=model, dtype=dtype)
    if feature:  # the preset's SAE and first clamp steer the given feature(s)
        keys.update(sae=sae, clamp_csv=clamp)
    v = {"sae": sae, "clamp_csv": clamp, **from_preset(preset, **keys)}
    model, dtype, sae, clamp = v["model"], v["dtype"], v["sae"], v["clamp_csv"]
    steering = steering_from_options(sae, feature, clamp, direction, alpha, spec, policy, name)
    cfg = RefusalEvalConfig(
        datasets=_split_list(dataset), limit=limit, seed=seed, judge=judge, judge_base_url=judge_base_url,
        judge_api_key_env=judge_api_key_env, max_new_tokens=max_new_tokens, early_stop=early_stop,
        batch_size=batch_size, system=system, exclude_ids=_read_ids(exclude) if exclude else [], out=str(out),
        device=_device(device),
    )
    m, tok = _load(model, device, threads, dtype)
    s = run_refusal_eval(m, tok, cfg, steering=steering)
    extra = f"{s['n_items']} items, generation {s['seconds_generate']:.1f} s → {out}"
    if s["n_failed"]:
        extra += f"\n[yellow]warning: the judge failed on {s['n_failed']} items (see 'error' in items.jsonl); " \
                 "rates are over the judged items[/yellow]"
    _print_rates(f"refusal ({s['steering']}, judge {s['judge']})", list(s["subsets"].items()), extra)


def _read_ids(path: Path) -> list[str]:
    from saesteer.core import read_json

    obj = read_json(path, "id list")
    if isinstance(obj, dict):  # e.g. a features selection.json: every list under a key mentioning "ids"
        obj = [i for k, v in obj.items() if "ids" in k.lower() and isinstance(v, list) for i in v]
    ensure(isinstance(obj, list), f"{path}: expected a JSON list of ids")
    return [str(i) for i in obj]


@eval_app.command("judges")
def judges_cmd(
    judge: list[str] = typer.Option(["prefix"], help="judge(s) to score: prefix | model:openai:NAME | model:hf:NAME | "
                                    "classifier:PATH; repeat or comma"),
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
    for spec in _split_list(judge):
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



@eval_app.command("multiturn")
def multiturn_cmd(
    model: str = typer.Option("qwen2.5-coder-0.5b-instruct", help=MODEL_HELP),
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
    sae: Optional[Path] = SAE_OPT, feature: Optional[str] = FEATURE_OPT, clamp: Optional[str] = CLAMP_OPT,
    direction: Optional[Path] = DIRECTION_OPT, alpha: float = ALPHA_OPT, spec: Optional[Path] = SPEC_OPT,
    policy: Optional[Path] = POLICY_OPT, name: Optional[str] = NAME_OPT,
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
) -> None:
    """Multi-turn refusal: replay red-team conversations turn by turn, or run Crescendo-style attacks (ASR)."""
    from ..evals.multiturn import MultiTurnConfig, run_crescendo, run_replay

    ensure(mode in ("replay", "crescendo"), f"--mode must be replay or crescendo, got {mode!r}")
    steering = steering_from_options(sae, feature, clamp, direction, alpha, spec, policy, name)
    cfg = MultiTurnConfig(
        mode=mode, dataset=dataset, limit=limit, seed=seed, max_turns=max_turns, min_turns=min_turns,
        max_new_tokens=max_new_tokens, batch_size=batch_size, system=system, judge=judge, attacker=attacker,
        attacker_base_url=attacker_base_url, api_key_env=api_key_env, success_judge=success_judge,
        max_backtracks=max_backtracks, out=str(out), device=_device(device),
    )
    m, tok = _load(model, device, threads)
    if mode == "replay":
        s = run_replay(m, tok, cfg, steering=steering)
        rows = [(f"turn {t}", r) for t, r in s["per_turn"].items()]
        rows += [(f"refused by turn {t}", r) for t, r in s["cumulative"].items()]
        _print_rates(f"multi-turn replay ({s['steering']}, {s['n_conversations']} conversations)", rows, f"→ {out}")
    else:
        s = run_crescendo(m, tok, cfg, steering=steering)
        _print_rates(f"crescendo ASR ({s['steering']}, attacker {s['attacker']})",
                     [("attack success", {**s["asr"], "n_failed": s["n_failed"]})],
                     f"mean turns {s['mean_turns']:.2f}, mean backtracks {s['mean_backtracks']:.2f} → {out}")
