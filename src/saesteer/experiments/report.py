"""``saesteer report RUN_DIR``: a self-contained HTML page and PNG plots from a sweep's results.

Reads ``RUN_DIR/results.jsonl`` (one row per condition × metric, see :mod:`saesteer.experiments.sweep`) and each
condition's ``conditions/<slug>/refusal/items.jsonl``; writes ``RUN_DIR/report/`` atomically:

- ``tradeoff.png``: refusal on unsafe prompts vs refusal on safe prompts (pooled over the sets of each group), one
  point per condition with 95 % Wilson error bars on both axes;
- ``clamp.png``: unsafe refusal, safe refusal and every capability metric vs clamp value, per swept feature (and the
  control feature), unsteered as dashed lines;
- ``categories.png``: refusal per category, unsteered vs the highlighted condition;
- ``index.html``: the plots inlined as base64, the results table (rate, k / n, interval on every number) and example
  answers steered vs unsteered. The highlighted condition is ``--condition`` or else the feature clamp with the
  largest pooled (unsafe − safe) refusal difference.
"""

from __future__ import annotations

import base64
import html
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from saesteer.core import atomic_dir, ensure, figure_png

from .results import pooled, read_results, slug

COLORS = {"unsteered": "#444444", "clamp": "#1f77b4", "control": "#2ca02c", "direction": "#d62728"}


def load_run(run_dir: str | Path) -> tuple[list[dict], dict]:
    from saesteer.core import read_json


    run = Path(run_dir)
    ensure(run.is_dir(), f"run folder not found: {run}")
    rows = read_results(run / "results.jsonl")
    ensure(rows, f"{run} has no results.jsonl rows (run `saesteer sweep --out {run}` first)")
    for i, r in enumerate(rows, 1):
        missing = [k for k in ("condition", "group", "metric", "rate", "n", "ci_low", "ci_high") if k not in r]
        ensure(not missing, f"{run}/results.jsonl: row {i} lacks {', '.join(missing)}")
    meta = read_json(run / "sweep.json", "sweep config") if (run / "sweep.json").exists() else {}
    return rows, meta


def conditions(rows: list[dict]) -> list[dict]:
    seen: dict[str, dict] = {}
    for r in rows:
        seen.setdefault(r["condition"], {k: r.get(k) for k in ("condition", "kind", "feature", "clamp", "clamp_from", "alpha",
                                                             "strength")})
    return list(seen.values())


def highlight(rows: list[dict], name: str | None = None) -> str | None:
    names = [c["condition"] for c in conditions(rows)]
    if name is not None:
        ensure(name in names, f"no condition {name!r} in the results (have: {', '.join(names)})")
        return name
    un, sa = pooled(rows, "unsafe"), pooled(rows, "safe")
    cands = [c["condition"] for c in conditions(rows) if c["kind"] == "clamp" and c["condition"] in un]
    if not cands:
        return next((n for n in names if n != "unsteered"), None)
    return max(cands, key=lambda c: un[c]["rate"] - (sa[c]["rate"] if c in sa else 0.0))


def _err(s: dict) -> tuple[list[float], list[float]]:
    return [s["rate"] - s["ci_low"]], [s["ci_high"] - s["rate"]]


def _png(fig: Any) -> bytes:
    return figure_png(fig, dpi=110, tight=True)


def plot_tradeoff(rows: list[dict]) -> bytes | None:
    import matplotlib.pyplot as plt

    un, sa = pooled(rows, "unsafe"), pooled(rows, "safe")
    conds = [c for c in conditions(rows) if c["condition"] in un and c["condition"] in sa]
    if not conds:
        return None
    fig, ax = plt.subplots(figsize=(7, 5.5))
    for c in conds:
        u, s = un[c["condition"]], sa[c["condition"]]
        ax.errorbar(s["rate"], u["rate"], xerr=_err(s), yerr=_err(u), fmt="o", capsize=3,
                    color=COLORS.get(c["kind"], "#9467bd"), alpha=0.85)
        label = "unsteered" if c["kind"] == "unsteered" else ("ctrl " if c["kind"] == "control" else "") + (
            f"{c['clamp']:g}" if c.get("clamp") is not None else f"x{c['alpha']:g}" if c.get("alpha") is not None
            else f"policy x{c['strength']:g}" if c.get("strength") is not None else "")
        ax.annotate(label, (s["rate"], u["rate"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    for kind, col in COLORS.items():
        if any(c["kind"] == kind for c in conds):
            ax.plot([], [], "o", color=col, label=kind)
    ax.set_xlabel("refusal on SAFE prompts (over-refusal; lower is better)")
    ax.set_ylabel("refusal on UNSAFE prompts (higher is better)")
    ax.set_xlim(-0.03, 1.03), ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3), ax.legend(loc="lower right")
    ax.set_title("Refusal trade-off per condition (95 % Wilson intervals; labels: clamp / alpha)")
    return _png(fig)


def _series(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """metric → condition → summary, for pooled unsafe / safe and every capability metric."""
    out: dict[str, dict[str, dict]] = {"refusal on unsafe (pooled)": pooled(rows, "unsafe"),
                                       "refusal on safe (pooled)": pooled(rows, "safe")}
    for r in rows:
        if r["group"] == "capability":
            out.setdefault(r["metric"], {})[r["condition"]] = r
    return out


def plot_clamp(rows: list[dict]) -> bytes | None:
    import matplotlib.pyplot as plt

    conds = [c for c in conditions(rows) if c["kind"] in ("clamp", "control") and c.get("clamp") is not None]
    if not conds:
        return None
    series = {m: s for m, s in _series(rows).items() if s}
    lines = sorted({(c["kind"], c["feature"]) for c in conds}, key=lambda x: (x[0] != "clamp", x[1]))
    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.8), squeeze=False)
    for ax, (metric, per) in zip(axes[0], series.items()):
        for kind, feat in lines:
            pts = sorted((c["clamp"], per[c["condition"]]) for c in conds
                         if (c["kind"], c["feature"]) == (kind, feat) and c["condition"] in per)
            if pts:
                xs = [p[0] for p in pts]
                ys = [p[1]["rate"] for p in pts]
                lo = [p[1]["rate"] - p[1]["ci_low"] for p in pts]
                hi = [p[1]["ci_high"] - p[1]["rate"] for p in pts]
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=f"{kind} f{feat}",
                            color=COLORS[kind] if kind == "control" else None)
        if "unsteered" in per:
            ax.axhline(per["unsteered"]["rate"], ls="--", color=COLORS["unsteered"], label="unsteered")
        ax.set_title(metric, fontsize=10), ax.set_xlabel("clamp value"), ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("rate (95 % interval)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("Refusal and capability vs clamp value")
    return _png(fig)


def plot_categories(rows: list[dict], chosen: str | None) -> bytes | None:
    import matplotlib.pyplot as plt

    cats = [r for r in rows if r["group"] == "category" and r["condition"] in ("unsteered", chosen)]
    names = sorted({r["metric"].removeprefix("refusal/") for r in cats})
    if not names or chosen is None:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names) + 2), 4.5))
    w = 0.4
    for j, cond in enumerate(("unsteered", chosen)):
        per = {r["metric"].removeprefix("refusal/"): r for r in cats if r["condition"] == cond}
        xs = [i + (j - 0.5) * w for i, n in enumerate(names) if n in per]
        ss = [per[n] for n in names if n in per]
        ax.bar(xs, [s["rate"] for s in ss], w, yerr=[[s["rate"] - s["ci_low"] for s in ss],
                                                     [s["ci_high"] - s["rate"] for s in ss]],
               capsize=2, label=cond, color=COLORS["unsteered"] if j == 0 else COLORS["clamp"])
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("refusal rate"), ax.set_ylim(0, 1.05), ax.legend()
    ax.set_title("Refusal per category (set/category), 95 % intervals")
    return _png(fig)


def examples(run: Path, rows: list[dict], chosen: str | None, per_group: int = 4) -> list[dict]:
    """Same prompt, unsteered vs ``chosen`` answer: the first ``per_group`` items of each subset."""

    if chosen is None:
        return []

    def items(cond: str) -> dict[tuple, dict]:
        p = run / "conditions" / slug(cond) / "refusal" / "items.jsonl"
        if not p.exists():
            return {}
        out = {}
        for line in p.read_text(encoding="utf-8").splitlines():
            if line.strip():
                r = json.loads(line)
                out[(r.get("subset"), str(r.get("id")))] = r
        return out

    base, steered = items("unsteered"), items(chosen)
    taken: dict[str, int] = defaultdict(int)
    out = []
    for key, b in base.items():
        s = steered.get(key)
        if s is None or taken[key[0]] >= per_group:
            continue
        taken[key[0]] += 1
        prompt = b.get("prompt")
        if isinstance(prompt, list):
            prompt = " / ".join(str(m.get("content", "")) for m in prompt)
        out.append({"subset": key[0], "prompt": str(prompt), "unsteered": b.get("answer", ""),
                    "unsteered_refusal": b.get("label"), "steered": s.get("answer", ""), "steered_refusal": s.get("label")})
    return out


def _fmt(r: dict) -> str:
    k = "" if r.get("k") is None else f"{r['k']} / "
    return f"{r['rate']:.3f} <small>({k}{r['n']}; [{r['ci_low']:.3f}, {r['ci_high']:.3f}])</small>"


def render_html(rows: list[dict], meta: dict, images: dict[str, bytes], exs: list[dict], chosen: str | None) -> str:
    e = html.escape
    conds = conditions(rows)
    metrics = [m for g in ("unsafe", "safe", "capability") for m in dict.fromkeys(r["metric"] for r in rows if r["group"] == g)]
    by = {(r["condition"], r["metric"]): r for r in rows}
    un, sa = pooled(rows, "unsafe"), pooled(rows, "safe")
    head = "".join(f"<th>{e(m)}</th>" for m in ["condition", "unsafe (pooled)", "safe (pooled)", *metrics])
    body = []
    for c in conds:
        n = c["condition"]
        cells = [_fmt(un[n]) if n in un else "–", _fmt(sa[n]) if n in sa else "–"]
        cells += [_fmt(by[(n, m)]) if (n, m) in by else "–" for m in metrics]
        cls = ' class="hl"' if n == chosen else ""
        body.append(f"<tr{cls}><td>{e(n)}</td>" + "".join(f"<td>{x}</td>" for x in cells) + "</tr>")
    imgs = "".join(f'<h2>{e(t)}</h2><img alt="{e(t)}" src="data:image/png;base64,{base64.b64encode(b).decode()}">'
                   for t, b in images.items())
    ex_rows = "".join(
        f"<tr><td>{e(x['subset'] or '')}</td><td>{e(x['prompt'])}</td>"
        f"<td class=\"{'ref' if x['unsteered_refusal'] else 'comp'}\">{e(str(x['unsteered']))}</td>"
        f"<td class=\"{'ref' if x['steered_refusal'] else 'comp'}\">{e(str(x['steered']))}</td></tr>" for x in exs)
    cfg = meta.get("config", {})
    info = ", ".join(f"{k}: {e(str(cfg[k]))}" for k in ("model", "sae", "refusal_limit", "capability_limit", "seed")
                     if k in cfg)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>saesteer sweep report</title><style>
body{{font-family:sans-serif;margin:24px;color:#222;background:#fff}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:4px 6px;vertical-align:top}} th{{background:#eef}} tr.hl{{background:#fff6d5}}
img{{max-width:100%;border:1px solid #ddd}} td.ref{{background:#fde2e2}} td.comp{{background:#e3f6e3}}
small{{color:#666}}</style></head><body>
<h1>saesteer sweep report</h1><p>{info}</p>
<p>Every number: rate <small>(k / n; 95 % interval)</small>; intervals are Wilson score intervals (TruthfulQA MC2: normal).
Highlighted condition: <b>{e(chosen or '–')}</b>.</p>
<h2>Results</h2><table><tr>{head}</tr>{''.join(body)}</table>
{imgs}
<h2>Example answers: unsteered vs {e(chosen or '–')}</h2>
<p>Red: judged a refusal; green: not a refusal.</p>
<table><tr><th>set</th><th>prompt</th><th>unsteered</th><th>steered</th></tr>{ex_rows}</table>
</body></html>
"""


def make_report(run_dir: str | Path, condition: str | None = None, out: str | Path | None = None) -> Path:
    """Write ``report/`` (index.html + PNGs) for a sweep run folder and return the HTML path."""
    import matplotlib

    matplotlib.use("Agg")
    run = Path(run_dir)
    rows, meta = load_run(run)
    chosen = highlight(rows, condition)
    images = {t: b for t, b in (("Refusal trade-off", plot_tradeoff(rows)), ("Capability vs clamp", plot_clamp(rows)),
                                ("Per-category refusal", plot_categories(rows, chosen))) if b}
    exs = examples(run, rows, chosen)
    dest = Path(out) if out else run / "report"
    files = {"Refusal trade-off": "tradeoff.png", "Capability vs clamp": "clamp.png",
             "Per-category refusal": "categories.png"}
    with atomic_dir(dest) as tmp:
        for t, b in images.items():
            (tmp / files[t]).write_bytes(b)
        (tmp / "index.html").write_text(render_html(rows, meta, images, exs, chosen), encoding="utf-8")
    return dest / "index.html"
