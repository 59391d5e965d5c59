"""Feature cards (static HTML + JSON) from per-token latents (:mod:`.latents`).

A card shows, for one latent: the top-activating contexts with token-level highlighting, the histogram of its
non-zero activations (PNG, inlined as base64 in the HTML), and the output tokens its decoder direction promotes and
suppresses through the unembedding: ``W_U · (g ⊙ W_dec[f])`` where ``g`` is the final norm's weight (``1 + g`` for
Gemma norms). The final norm's data-dependent scale is ignored (it is positive, so the ranking is unchanged).

Position 0 and special tokens are not encoded (attention sinks the SAE never saw); they show with no activation.
"""

from __future__ import annotations

import base64
import html
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from saesteer.core import ensure, figure_png

from .latents import SeqLatents


# --------------------------------------------------------------------------------------------- cards
@dataclass
class CardConfig:
    """Settings of :func:`feature_cards`."""

    n_contexts: int = 8
    """Top-activating contexts per feature (one per text: the text's maximum)."""
    window: int = 16
    """Tokens shown on each side of the maximum."""
    n_tokens: int = 12
    """Promoted and suppressed output tokens listed."""
    bins: int = 30
    """Histogram bins."""
    max_tokens: int = 256
    """Texts are cut to this many tokens."""
    batch_size: int = 8
    """Encoding batch size."""


def final_norm_weight(model: Any) -> torch.Tensor | None:
    """Effective elementwise gain of the final norm before the unembedding (None when there is none)."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), model)
    for name in ("norm", "ln_f", "final_layer_norm", "final_norm"):
        norm = getattr(base, name, None)
        if norm is not None and getattr(norm, "weight", None) is not None:
            w = norm.weight.detach().float()
            return 1.0 + w if type(norm).__name__.startswith("Gemma") else w
    return None


def logit_effects(model: Any, tok: Any, sae: Any, f: int, n: int = 12) -> dict[str, list[dict[str, Any]]]:
    """Tokens the decoder direction of latent ``f`` promotes (largest logits) and suppresses (smallest)."""
    W_U = model.get_output_embeddings().weight.detach().float().cpu()
    d = sae.decoder_direction(f).detach().float().cpu()
    g = final_norm_weight(model)
    v = d * g.cpu() if g is not None else d
    logits = (W_U @ v)[: len(tok)]
    n = min(n, logits.numel())

    def rows(vals: torch.Tensor, ids: torch.Tensor) -> list[dict[str, Any]]:
        return [{"id": int(i), "token": tok.decode([int(i)]), "logit": float(x)} for x, i in zip(vals, ids)]

    top = torch.topk(logits, n)
    bot = torch.topk(-logits, n)
    return {"promotes": rows(top.values, top.indices), "suppresses": rows(-bot.values, bot.indices)}


def histogram(values: torch.Tensor, bins: int) -> tuple[list[float], list[float]]:
    """``(counts, edges)`` of the values (a unit-wide range around a single repeated value; empty for no values)."""
    if not values.numel():
        return [], []
    v = values.double()
    lo, hi = float(v.min()), float(v.max())
    if hi - lo < 1e-6 * max(1.0, abs(hi)):
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = torch.histogram(v, bins=bins, range=(lo, hi))
    return counts.tolist(), edges.tolist()


def _hist_png(counts: list[float], edges: list[float], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 2.4), dpi=90)
    if counts:
        ax.stairs(counts, edges, fill=True, color="#c0392b")
        ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("activation (non-zero)", fontsize=8)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    return figure_png(fig)


def feature_cards(
    model: Any, tok: Any, sae: Any, features: Sequence[int], seqs: Sequence[SeqLatents], cfg: CardConfig | None = None,
) -> dict[str, Any]:
    """Cards for ``features`` from already encoded sequences (see :func:`encode_sequences`)."""
    cfg = cfg or CardConfig()
    features = sae.check_features(features)
    ensure(len(seqs) > 0, "no encoded texts for the feature cards")
    cards = []
    n_tok = sum(int(s.valid.sum()) for s in seqs)
    for f in features:
        per = [s.feature_acts(f) for s in seqs]
        nz = torch.cat([a[s.valid & (a > 0)] for a, s in zip(per, seqs)])
        peaks = sorted(((float(a.max()), i) for i, a in enumerate(per) if a.numel()), reverse=True)
        ctx = []
        for mx, i in peaks[: cfg.n_contexts]:
            if mx <= 0:
                break
            j = int(torch.argmax(per[i]))
            lo, hi = max(0, j - cfg.window), min(len(per[i]), j + cfg.window + 1)
            ctx.append({"text_index": i, "max_act": mx, "peak": j - lo,
                        "tokens": [[tok.decode([t]), round(float(a), 4)]
                                   for t, a in zip(seqs[i].token_ids[lo:hi], per[i][lo:hi].tolist())]})
        counts, edges = histogram(nz, cfg.bins)
        cards.append({
            "feature": f, "n_tokens": n_tok, "n_firing": int(nz.numel()), "freq": nz.numel() / max(n_tok, 1),
            "max_act": float(nz.max()) if nz.numel() else 0.0, "mean_when_firing": float(nz.mean()) if nz.numel()
            else 0.0, "histogram": {"counts": counts, "edges": edges}, "contexts": ctx,
            **logit_effects(model, tok, sae, f, cfg.n_tokens),
        })
    return {"model": getattr(model, "saesteer_name", None), "layer": sae.trained_layer,
            "n_texts": len(seqs), "config": asdict(cfg), "cards": cards}


_CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}.card{border:1px solid #ccc;border-radius:8px;
padding:1em;margin:1em 0}.ctx{font-family:monospace;white-space:pre-wrap;background:#fafafa;padding:.4em;margin:.3em 0;
border-left:3px solid #ddd}.tok{border-radius:2px}.peak{outline:1px solid #000}.cols{display:flex;gap:2em;flex-wrap:wrap}
table{border-collapse:collapse;font-size:.85em}td{padding:1px 6px;font-family:monospace}h2{margin:.2em 0}"""


def _tok_html(t: str, a: float, mx: float, peak: bool) -> str:
    alpha = min(1.0, a / mx) if mx > 0 and a > 0 else 0.0
    cls = "tok peak" if peak else "tok"
    style = f' style="background:rgba(220,40,40,{alpha:.2f})"' if alpha > 0 else ""
    return f'<span class="{cls}"{style} title="{a:.3f}">{html.escape(t)}</span>'


def render_html(result: dict[str, Any], title: str = "saesteer feature cards", preamble: str = "") -> str:
    """A self-contained page (inline CSS, base64 PNGs, no scripts or external links); ``preamble`` is trusted HTML
    placed under the title."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
             f"<p>model {html.escape(str(result.get('model')))}, layer {result.get('layer')}, "
             f"{result.get('n_texts')} texts</p>", preamble]
    for c in result["cards"]:
        png = base64.b64encode(_hist_png(c["histogram"]["counts"], c["histogram"]["edges"],
                                         f"latent {c['feature']}")).decode()
        label = f" — {html.escape(c['label'])}" if c.get("label") else ""
        parts.append(f"<div class='card' id='f{c['feature']}'><h2>latent {c['feature']}{label}</h2>"
                     f"<p>max {c['max_act']:.3f} · fires on {c['n_firing']}/{c['n_tokens']} tokens "
                     f"({100 * c['freq']:.2f} %) · mean when firing {c['mean_when_firing']:.3f}</p><div class='cols'>"
                     f"<img alt='histogram of latent {c['feature']}' src='data:image/png;base64,{png}'>")
        for key in ("promotes", "suppresses"):
            rows = "".join(f"<tr><td>{html.escape(repr(r['token']))}</td><td>{r['logit']:+.3f}</td></tr>"
                           for r in c[key])
            parts.append(f"<div><b>{key}</b><table>{rows}</table></div>")
        parts.append("</div><h3>top contexts</h3>")
        for x in c["contexts"]:
            toks = "".join(_tok_html(t, a, x["max_act"], k == x["peak"]) for k, (t, a) in enumerate(x["tokens"]))
            parts.append(f"<div class='ctx'>[{x['max_act']:.3f}] {toks}</div>")
        if not c["contexts"]:
            parts.append("<p>(never fires on these texts)</p>")
        parts.append("</div>")
    parts.append("</body></html>")
    return "".join(parts)


def write_cards(result: dict[str, Any], out_dir: Any, title: str = "saesteer feature cards", preamble: str = "") -> None:
    """Write ``cards.json``, ``cards.html`` and ``hist_<f>.png`` into an existing (temporary) folder."""
    from pathlib import Path

    from saesteer.core import atomic_write_bytes, atomic_write_json, atomic_write_text

    out = Path(out_dir)
    atomic_write_json(out / "cards.json", result)
    atomic_write_text(out / "cards.html", render_html(result, title, preamble))
    for c in result["cards"]:
        atomic_write_bytes(out / f"hist_{c['feature']}.png",
                           _hist_png(c["histogram"]["counts"], c["histogram"]["edges"], f"latent {c['feature']}"))


def grid_table_html(grid: dict[str, Any]) -> str:
    """The clamp grid (baseline first) as an HTML table: refusal k/n on harmful and harmless prompts, objective."""
    def cell(r: dict[str, Any]) -> str:
        h, s = r["harmful_refusal"], r["harmless_refusal"]
        return (f"<tr><td>{r['feature'] if r['feature'] is not None else 'none'}</td><td>"
                f"{'' if r['clamp'] is None else format(r['clamp'], 'g')} {html.escape(str(r['clamp_from']))}</td>"
                f"<td>{h['k']}/{h['n']}</td><td>{s['k']}/{s['n']}</td><td>{r['objective']:+.3f} "
                f"[{r['objective_ci'][0]:+.2f}, {r['objective_ci'][1]:+.2f}]</td></tr>")

    rows = "".join(cell(r) for r in [grid["baseline"], *grid["rows"]])
    return (f"<h2>clamp grid</h2><p>{html.escape(grid['objective'])}</p><table><tr><th>latent</th><th>clamp</th>"
            f"<th>harmful refused</th><th>harmless refused</th><th>objective [95 % CI]</th></tr>{rows}</table>")
