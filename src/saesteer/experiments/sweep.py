"""Clamp sweeps: refusal, over-refusal and capability for every steering condition, in one results table.

Conditions (in this order): the unsteered baseline; each swept feature at each absolute clamp value and at each
multiple of the feature's max activation (``ranking.json``'s ``max_act`` from ``saesteer features``); the control
feature (a live latent unrelated to refusal, the paper's control) at the same clamp values; the refusal-direction
baseline (Arditi et al.) at each ``alpha``; a policy file (``policy``: a gated clamp, a system prompt + clamp, a
two-sided policy, ...) at each multiple of its steering strength (``strengths``, :meth:`Policy.with_strength`; the
prompts the policy was fitted on are left out of the refusal eval). For each condition:

- refusal on the unsafe sets and over-refusal on the safe sets (:func:`saesteer.evals.refusal.run_refusal_eval`,
  prefix judge; prompts used to choose the feature, listed in ``selection.json``, are left out),
- MMLU / TruthfulQA-MC1 / GSM8K on small seeded subsets (:func:`saesteer.evals.capability.run_capability`).

``OUT/results.jsonl`` gets one row per (condition, metric) — ``condition, kind, feature, clamp, clamp_from, alpha,
group (unsafe | safe | capability | category), metric, rate, k, n, ci_low, ci_high`` — and each condition's per-item
answers go to ``OUT/conditions/<slug>/{refusal,capability}/``. Resumable: a condition whose rows are already in
results.jsonl is skipped, so re-running the same command continues where it stopped (and extra clamp values can be
added later); a different evaluation setup in the same folder is refused.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from saesteer.core import atomic_write_json, atomic_write_text, ensure, read_json
from saesteer.models import DEFAULT_MODEL

from .results import read_results, slug

EVAL_KEYS = ("model", "sae", "unsafe", "safe", "refusal_limit", "max_new_tokens", "capability_tasks",
             "capability_limit", "gsm8k_limit", "mmlu_shots", "seed", "policy")


@dataclass
class SweepConfig:
    """What `saesteer sweep` runs."""

    out: str = "runs/sweep"
    """Run folder: results.jsonl, sweep.json, conditions/<slug>/..."""
    model: str = DEFAULT_MODEL
    """Model to steer (built-in name, HF folder, .gguf or hub id)."""
    sae: str | None = None
    """SAE folder whose latents are clamped (needed for feature / control conditions)."""
    features_dir: str | None = None
    """Output of `saesteer features` (selection.json, ranking.json): default feature, control, max activations,
    and the prompts used for selection (left out of the refusal eval)."""
    features: list[int] = field(default_factory=list)
    """Features to sweep (default: selection.json's chosen feature)."""
    clamps: list[float] = field(default_factory=lambda: [0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0])
    """Absolute clamp values (latent units)."""
    relative_clamps: list[float] = field(default_factory=list)
    """Clamp values as multiples of each feature's max activation (needs ranking.json or max_acts)."""
    max_acts: dict[int, float] = field(default_factory=dict)
    """Feature → max activation, overriding ranking.json."""
    control: int | None = None
    """Control feature (default: selection.json's ``control``); -1 = none."""
    control_clamps: list[float] | None = None
    """Clamp values for the control (default: the absolute clamps except 0, plus the largest relative clamp of the
    first feature, so the control is also tried at the strongest clamp of the sweep)."""
    direction: str | None = None
    """Refusal-direction file (`saesteer direction`) for the baseline; None = no direction conditions."""
    alphas: list[float] = field(default_factory=lambda: [1.0, 2.0])
    """Coefficients of the added direction."""
    policy: str | None = None
    """A policy file (``saesteer policy fit``) whose steering strength is swept; None = no policy conditions."""
    strengths: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.5, 2.0])
    """Multiples of the policy's steering strength (clamp values, an add's alpha), one condition each."""
    unsafe: list[str] = field(default_factory=lambda: ["xstest-unsafe", "advbench:test", "jbb-harmful"])
    """Prompt sets where refusing is right (refusal rate)."""
    safe: list[str] = field(default_factory=lambda: ["xstest-safe", "jbb-benign"])
    """Prompt sets where refusing is wrong (over-refusal rate)."""
    refusal_limit: int | None = 50
    """Seeded sample per prompt set."""
    max_new_tokens: int = 24
    """Answer budget for the prefix judge (rows stop once decided)."""
    capability_tasks: list[str] = field(default_factory=lambda: ["mmlu", "truthfulqa_mc1", "gsm8k"])
    """Capability tasks per condition (mmlu, truthfulqa_mc1, truthfulqa_mc2, gsm8k, mmlu_chat, gsm8k_chat,
    humaneval); empty = none. The generative ones (gsm8k, gsm8k_chat, humaneval) run on ``gsm8k_limit``."""
    capability_limit: int = 50
    """Questions per MMLU / TruthfulQA task."""
    gsm8k_limit: int = 20
    """GSM8K questions (generation is the slow part)."""
    mmlu_shots: int = 0
    """MMLU exemplars."""
    batch_size: int = 16
    """Batch size for generation and scoring."""
    seed: int = 0
    """Seed of every subsample."""
    device: str = "cpu"
    """Device of the model."""
    model_dtype: str = "auto"
    """dtype the model runs in (float32 | bfloat16 | float16 | auto = ``core.default_dtype``); SAE and clamp math stay
    float32."""
    progress: bool = True
    """Progress bars."""


def _features_info(cfg: SweepConfig) -> tuple[dict, dict[int, float]]:
    if not cfg.features_dir:
        return {}, {}
    d = Path(cfg.features_dir)
    sel = read_json(d / "selection.json", "feature selection")
    max_acts: dict[int, float] = {}
    if (d / "ranking.json").exists():
        col = read_json(d / "ranking.json", "feature ranking").get("metrics", {}).get("max_act") or []
        max_acts = {i: float(v) for i, v in enumerate(col) if v is not None}
    return sel, max_acts


def plan_conditions(cfg: SweepConfig) -> list[dict[str, Any]]:
    """Every condition of the sweep, as dicts with name, kind, feature, clamp, clamp_from, alpha and ``specs``."""
    sel, max_acts = _features_info(cfg)
    max_acts.update({int(k): float(v) for k, v in cfg.max_acts.items()})
    feats = list(cfg.features) or ([int(sel["feature"])] if sel.get("feature") is not None else [])
    control = cfg.control if cfg.control is not None else sel.get("control")
    control = None if control in (None, -1) else int(control)
    conds: list[dict[str, Any]] = [{"name": "unsteered", "kind": "unsteered", "specs": []}]

    def clamp_cond(kind: str, f: int, v: float, how: str) -> dict[str, Any]:
        name = f"{'control ' if kind == 'control' else ''}clamp f{f}={v:g}" + (f" ({how})" if how != "abs" else "")
        spec = {"kind": "clamp", "sae": cfg.sae, "features": [f], "values": [v]}
        return {"name": name, "kind": kind, "feature": f, "clamp": v, "clamp_from": how, "specs": [spec]}

    if feats or control is not None:
        ensure(cfg.sae is not None, "feature conditions need --sae")
    strongest: list[float] = []  # the first feature's largest relative clamp, for the control
    for f in feats:
        conds += [clamp_cond("clamp", f, float(v), "abs") for v in cfg.clamps]
        if cfg.relative_clamps:
            ensure(f in max_acts and max_acts[f] > 0, f"relative clamps need feature {f}'s max activation "
                   "(--features-dir with ranking.json, or max_acts)")
            conds += [clamp_cond("clamp", f, round(m * max_acts[f], 4), f"{m:g}x max") for m in cfg.relative_clamps]
            strongest = strongest or [round(max(cfg.relative_clamps) * max_acts[f], 4)]
    if control is not None:
        vals = cfg.control_clamps if cfg.control_clamps is not None else list(dict.fromkeys(
            [v for v in cfg.clamps if v != 0] + [v for v in strongest if v not in cfg.clamps]))
        conds += [clamp_cond("control", control, float(v), "abs") for v in vals]
    if cfg.direction:
        ensure(Path(cfg.direction).exists(), f"direction file not found: {cfg.direction}")
        conds += [{"name": f"direction x{a:g}", "kind": "direction", "alpha": float(a),
                   "specs": [{"kind": "add", "direction": cfg.direction, "alpha": float(a)}]} for a in cfg.alphas]
    if cfg.policy:
        pol = _policy(cfg)
        ensure(len(cfg.strengths) > 0, "--policy needs at least one strength multiplier (--strengths)")
        for m in cfg.strengths:
            pol.with_strength(float(m))  # fails here on a policy without a strength (e.g. a system prompt only)
        conds += [{"name": f"{pol.name} x{m:g}", "kind": "policy", "strength": float(m), "gate": pol.gate.kind,
                   "policy": cfg.policy, "specs": []} for m in cfg.strengths]
    names = [c["name"] for c in conds]
    ensure(len(set(names)) == len(names), "duplicate sweep conditions (repeated clamp values?)")
    return conds


def _policy(cfg: SweepConfig) -> Any:
    from saesteer.gating import load_policy

    ensure(Path(str(cfg.policy)).exists(), f"policy file not found: {cfg.policy}")
    return load_policy(str(cfg.policy))


def excluded_ids(cfg: SweepConfig) -> list[str]:
    """``<eval set>/<id>`` for every prompt that selection.json says was used to pick the feature, and every prompt
    the swept policy was fitted or calibrated on (its ``meta.used_prompts``)."""
    sel, _ = _features_info(cfg)
    used = [r for rs in (sel.get("prompts_used") or {}).values() for r in rs]

    def base(spec: str) -> str:
        return re.sub(r"-(un)?safe$", "", spec.split(":")[0])

    out = {f"{s}/{r['id']}" for r in used for s in cfg.unsafe + cfg.safe if base(str(r.get("spec", ""))) == base(s)}
    keys = set(_policy(cfg).meta.get("used_prompts") or []) if cfg.policy else set()
    if keys:
        from saesteer.data import load_prompts
        from saesteer.gating import text_key

        out |= {f"{s}/{it.id}" for s in cfg.unsafe + cfg.safe for it in load_prompts(s)
                if text_key(it.messages or it.prompt) in keys}
    return sorted(out)


def condition_rows(cond: dict, refusal: dict | None, capability: dict | None, unsafe: list[str]) -> list[dict]:
    """Results-table rows of one condition from the refusal summary and the capability summaries."""
    base = {k: cond.get(k) for k in ("kind", "feature", "clamp", "clamp_from", "alpha", "strength")}
    base["condition"] = cond["name"]
    unsafe_names = {s.replace(":", "-") for s in unsafe}
    rows = []
    for sub, s in ((refusal or {}).get("subsets") or {}).items():
        group = "unsafe" if (s.get("kind") == "refusal" or sub in unsafe_names) else "safe"
        keep = {k: s[k] for k in ("rate", "k", "n", "ci_low", "ci_high")}
        rows.append({**base, "group": group, "metric": f"refusal/{sub}", **keep})
        for cat, c in (s.get("categories") or {}).items():
            rows.append({**base, "group": "category", "metric": f"refusal/{sub}/{cat}",
                         **{k: c[k] for k in ("rate", "k", "n", "ci_low", "ci_high")}})
    for metric, s in (capability or {}).items():
        if "/" not in metric:
            rows.append({**base, "group": "capability", "metric": metric,
                         **{k: s[k] for k in ("rate", "k", "n", "ci_low", "ci_high")}})
    return rows


def run_sweep(cfg: SweepConfig, model: Any = None, tok: Any = None,
              on_condition: Callable[[dict, list[dict]], None] | None = None) -> list[dict[str, Any]]:
    """Run every condition not yet in ``results.jsonl``; returns all rows (old and new)."""
    from rich.progress import Progress

    from saesteer.evals import (
        GENERATIVE_TASKS,
        CapabilityConfig,
        RefusalEvalConfig,
        run_capability,
        run_refusal_eval,
        write_capability,
    )
    from saesteer.steering import Steering, SteeringSpec

    out = Path(cfg.out)
    conds = plan_conditions(cfg)
    meta_path = out / "sweep.json"
    if meta_path.exists():
        old = read_json(meta_path, "sweep config").get("config", {})
        diff = [k for k in EVAL_KEYS if k in old and old[k] != json.loads(json.dumps(asdict(cfg)[k]))]
        ensure(not diff, f"{out} holds a sweep with a different setup ({', '.join(diff)}); use another --out")
    excl = excluded_ids(cfg)
    atomic_write_json(meta_path, {"config": asdict(cfg), "conditions": conds, "excluded_ids": excl})
    results_path = out / "results.jsonl"
    rows = read_results(results_path)
    done = {r["condition"] for r in rows}
    todo = [c for c in conds if c["name"] not in done]
    if not todo:
        return rows
    if model is None:
        from saesteer.core import resolve_device
        from saesteer.models import load_model

        model, tok = load_model(cfg.model, device=resolve_device(cfg.device), dtype=cfg.model_dtype)
    from saesteer.steering import build_all, steer

    cache: dict = {}
    steerings: dict[str, Any] = {}
    for cond in todo:  # fail fast on an SAE / direction that does not fit the model, before any generation
        specs = [SteeringSpec.from_dict(s) for s in cond["specs"]]
        for s in specs:
            s.build(model, cache)
        with steer(model, build_all(specs, model)):
            pass
        pol = None
        if cond.get("policy"):
            pol = _policy(cfg).with_strength(cond["strength"], name=cond["name"])
            pol.check(model, pol.build(model, cache) + pol.build_low(model, cache))
        steerings[cond["name"]] = Steering(name=cond["name"], specs=specs, policy=pol)
    ecfg = dict(limit=cfg.refusal_limit, seed=cfg.seed, max_new_tokens=cfg.max_new_tokens,
                batch_size=cfg.batch_size, exclude_ids=excl, progress=cfg.progress)
    tasks = tuple(cfg.capability_tasks)
    with Progress(disable=not cfg.progress, transient=False) as bar:
        task = bar.add_task(f"sweep ({len(todo)} of {len(conds)} conditions left)", total=len(todo))
        for cond in todo:
            t0 = time.perf_counter()
            bar.update(task, description=f"sweep: {cond['name']}")
            st = steerings[cond["name"]]
            cdir = out / "conditions" / slug(cond["name"])
            refusal = run_refusal_eval(model, tok, RefusalEvalConfig(
                datasets=list(cfg.unsafe) + list(cfg.safe), out=str(cdir / "refusal"), **ecfg), steering=st)
            caps: dict = {}
            if tasks:
                for group, lim in ((tuple(t for t in tasks if t not in GENERATIVE_TASKS), cfg.capability_limit),
                                   (tuple(t for t in tasks if t in GENERATIVE_TASKS), cfg.gsm8k_limit)):
                    if not group:
                        continue
                    ccfg = CapabilityConfig(tasks=group, limit=lim, mmlu_shots=cfg.mmlu_shots, seed=cfg.seed,
                                            batch_size=cfg.batch_size, progress=cfg.progress)
                    s, items = run_capability(model, tok, ccfg, steering=st)
                    write_capability(cdir / f"capability-{'-'.join(group)}", ccfg, s, items,
                                     {"condition": cond["name"]})
                    caps.update(s)
            new = condition_rows(cond, refusal, caps, list(cfg.unsafe))
            for r in new:
                r["seconds"] = round(time.perf_counter() - t0, 1)
            rows += new
            atomic_write_text(results_path, "".join(json.dumps(r) + "\n" for r in rows))
            if on_condition:
                on_condition(cond, new)
            bar.advance(task)
    return rows
