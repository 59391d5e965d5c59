"""Per-token SAE latents on texts or chat turns, and feature cards (static HTML + JSON).

A card shows, for one latent: the top-activating contexts with token-level highlighting, the histogram of its
non-zero activations (PNG, inlined as base64 in the HTML), and the output tokens its decoder direction promotes and
suppresses through the unembedding: ``W_U · (g ⊙ W_dec[f])`` where ``g`` is the final norm's weight (``1 + g`` for
Gemma norms). The final norm's data-dependent scale is ignored (it is positive, so the ranking is unchanged).

Position 0 and special tokens are not encoded (attention sinks the SAE never saw); they show with no activation.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from saesteer.core import SaesteerError, ensure
from saesteer.models import format_chat, run_to_layer, special_token_ids


# --------------------------------------------------------------------------------------------- SAE accessors
def sae_layer(sae: Any) -> int:
    """The layer an SAE was trained on (``sae.cfg.layer``; negative means unknown)."""
    layer = getattr(getattr(sae, "cfg", None), "layer", None)
    ensure(layer is not None and int(layer) >= 0, "the SAE does not record its layer; pass the layer explicitly")
    return int(layer)


def check_features(sae: Any, features: Sequence[int]) -> list[int]:
    n = int(sae.num_latents)
    ensure(len(features) > 0, "no features given")
    for f in features:
        ensure(0 <= int(f) < n, f"feature {f} is out of range: the SAE has {n} latents (0..{n - 1})")
    return [int(f) for f in features]


# --------------------------------------------------------------------------------------------- per-token latents
@dataclass
class SeqLatents:
    """Top-k SAE latents of one token sequence. Masks are over its tokens; post/answer are subsets of valid."""

    text: str
    token_ids: list[int]
    acts: torch.Tensor
    """[T, w] active latents' activations (zeros where not encoded); w = k for Top-k SAEs, else the sequence's
    largest number of active latents per token."""
    idx: torch.Tensor
    """[T, w] their latent ids."""
    valid: torch.Tensor
    """[T] encoded positions (not position 0, not special tokens)."""
    post: torch.Tensor
    """[T] post-instruction positions: chat-template tokens after the user message."""
    answer: torch.Tensor
    """[T] answer tokens."""
    post_resid: torch.Tensor | None = None
    """[d] mean residual over the post-instruction positions (None when there are none)."""

    def feature_acts(self, f: int) -> torch.Tensor:
        """[T] activation of latent ``f`` at each token (0 where it is not in the top-k)."""
        return (self.acts * (self.idx == f)).sum(-1)


def dense_mean(seq: SeqLatents, mask: torch.Tensor, num_latents: int) -> torch.Tensor:
    """Mean dense latent vector over the positions in ``mask`` (zeros when the mask is empty)."""
    n = int(mask.sum())
    out = torch.zeros(num_latents)
    if n:
        out.index_add_(0, seq.idx[mask].flatten(), seq.acts[mask].flatten().float())
    return out / max(n, 1)


def _tokenize(tok: Any, item: Any, max_tokens: int | None) -> tuple[str, list[int], list[bool], list[bool]]:
    """(text, ids, post mask, answer mask) of a plain text or a ``(prompt, answer)`` chat turn."""
    if isinstance(item, str):
        prefix, content, answer = item, None, None
    else:
        content, answer = item
        prefix = format_chat(tok, content)
    post: list[bool]
    try:
        enc = tok(prefix, add_special_tokens=False, return_offsets_mapping=True)
        offs = enc["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError):
        enc, offs = tok(prefix, add_special_tokens=False), None
    ids = list(enc["input_ids"])
    post = [False] * len(ids)
    end = prefix.rfind(content) if content else -1
    if end >= 0:
        end += len(content)
        if offs is not None:
            post = [int(o[0]) >= end for o in offs]
        else:
            n = len(tok(prefix[:end], add_special_tokens=False)["input_ids"])
            post = [i >= n for i in range(len(ids))]
    ans = list(tok(answer, add_special_tokens=False)["input_ids"]) if answer else []
    ids, post, is_ans = ids + ans, post + [False] * len(ans), [False] * len(ids) + [True] * len(ans)
    if max_tokens is not None:
        ids, post, is_ans = ids[:max_tokens], post[:max_tokens], is_ans[:max_tokens]
    return prefix + (answer or ""), ids, post, is_ans


@torch.inference_mode()
def encode_sequences(
    model: Any, tok: Any, sae: Any, layer: int, items: Sequence[Any], batch_size: int = 8,
    include_special: bool = False, max_tokens: int | None = None, max_norm_ratio: float | None = 10.0,
) -> list[SeqLatents]:
    """Run the model to ``layer`` on each item and encode every valid token with the SAE.

    An item is a plain text (encoded as is) or ``(prompt, answer)``: the prompt chat-formatted with the tokenizer's
    template, the answer appended as the assistant's tokens. ``include_special`` also encodes special tokens at
    post-instruction positions. Tokens whose residual norm exceeds ``max_norm_ratio`` × the sequence's median are
    not encoded either: massive-activation tokens (e.g. the first system-prompt word of Qwen's template) give the SAE
    out-of-distribution inputs and absurd latent values that would swamp every max and mean.
    """
    ensure(len(items) > 0, "no texts to encode")
    special = special_token_ids(tok)
    toks = [_tokenize(tok, it, max_tokens) for it in items]
    for text, ids, _, _ in toks:
        ensure(len(ids) > 0, f"text {text[:40]!r} has no tokens")
    dev = next(model.parameters()).device
    sdt = sae.W_dec.dtype
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out: list[SeqLatents | None] = [None] * len(items)
    order = sorted(range(len(items)), key=lambda i: len(toks[i][1]))
    for b0 in range(0, len(order), batch_size):
        rows = order[b0 : b0 + batch_size]
        T = max(len(toks[i][1]) for i in rows)
        ids = torch.full((len(rows), T), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for r, i in enumerate(rows):
            n = len(toks[i][1])
            ids[r, T - n :] = torch.tensor(toks[i][1])
            mask[r, T - n :] = 1
        h = run_to_layer(model, ids.to(dev), mask.to(dev), layer)
        for r, i in enumerate(rows):
            text, tid, post_l, ans_l = toks[i]
            n = len(tid)
            post = torch.tensor(post_l)
            spec = torch.tensor([t in special for t in tid])
            valid = (~spec | post) if include_special else ~spec
            valid[0] = False
            if max_norm_ratio is not None and bool(valid.any()):
                norms = h[r, T - n :].float().norm(dim=-1).cpu()
                valid &= norms <= max_norm_ratio * norms[valid].median()
            a = j = None
            if bool(valid.any()):
                x = h[r, T - n :][valid.to(h.device)].to(device=sae.W_dec.device, dtype=sdt)
                ensure(bool(torch.isfinite(x).all()), "the model produced non-finite activations")
                a, j = sae.encode(x)  # width k (Top-k) or the most active latents of a row (ReLU / JumpReLU)
            width = a.shape[-1] if a is not None else max(1, int(getattr(sae, "k", 0) or 0))
            acts = torch.zeros(n, width)
            idx = torch.zeros(n, width, dtype=torch.long)
            if a is not None:
                acts[valid], idx[valid] = a.float().cpu(), j.long().cpu()
            hp = h[r, T - n :][(post & valid).to(h.device)]
            resid = hp.float().mean(0).cpu() if hp.shape[0] else None
            out[i] = SeqLatents(text, tid, acts, idx, valid, post & valid, torch.tensor(ans_l) & valid, resid)
    return [s for s in out if s is not None]


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
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def feature_cards(
    model: Any, tok: Any, sae: Any, features: Sequence[int], seqs: Sequence[SeqLatents], cfg: CardConfig | None = None,
) -> dict[str, Any]:
    """Cards for ``features`` from already encoded sequences (see :func:`encode_sequences`)."""
    cfg = cfg or CardConfig()
    features = check_features(sae, features)
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
    return {"model": getattr(model, "saesteer_name", None), "layer": sae_layer_or_none(sae),
            "n_texts": len(seqs), "config": asdict(cfg), "cards": cards}


def sae_layer_or_none(sae: Any) -> int | None:
    try:
        return sae_layer(sae)
    except SaesteerError:
        return None


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
