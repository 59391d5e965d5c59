"""SAE quality on held-out text: reconstruction (FVU, MSE, L0, dead / dense latents, density histogram) and the LM's
next-token cross-entropy / KL with the reconstruction spliced into the residual stream, against the clean model and a
zero-ablated residual → fraction of CE loss recovered.

Splicing and ablation touch the same positions the SAE is trained on: real tokens that are not the first of their
document and not special tokens (attention sinks there have norms ~100× larger and are never given to the SAE);
every other position keeps its clean residual. CE / KL are averaged over next-token predictions made at positions
≥ the first spliced one (the positions the intervention can influence).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from saesteer.core import atomic_write_bytes, atomic_write_json, ensure, figure_png, progress_bar, set_threads

DENSE_THRESHOLD = 0.1
"""A latent firing on more than this fraction of tokens counts as dense."""


@dataclass
class SAEEvalConfig:
    """``saesteer sae-eval`` settings."""

    model: str
    """Model the SAE belongs to (built-in name, local folder or hub id)."""
    sae: str
    """SAE folder (our, SAELens or sparsify format)."""
    data: str
    """Held-out text spec (see ``saesteer.data.prompts.load_texts``)."""
    out: str
    """JSON output file; the density histogram goes next to it as ``<stem>_density.png``."""
    layer: int | None = None
    """Layer to splice at; default the SAE's own layer."""
    max_docs: int = 64
    """Documents to evaluate."""
    context_len: int = 256
    """Tokens per document (truncated)."""
    batch_size: int = 8
    """Documents per forward pass."""
    ce_docs: int | None = None
    """Documents that also get the CE / KL passes (default all; the rest only feed reconstruction statistics)."""
    threads: int | None = None
    """torch intra-op threads."""
    device: str = "cpu"
    """cpu, cuda, cuda:N or auto."""
    model_dtype: str = "auto"
    """dtype the model runs in (float32 | bfloat16 | float16 | auto = ``core.default_dtype``); the SAE and its metrics
    stay float32."""


CE_CHUNK = 256
"""Prediction positions whose full-vocabulary logits exist at once (``[CE_CHUNK, vocab]`` fp32 per pass): the
whole ``[batch, seq, vocab]`` logits of three passes held 8+ GB on a 150k-vocabulary model."""


def final_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """fp32 next-token logits from final hidden states (``model_body`` output) — the LM head plus, where the
    architecture has them, final logit soft-capping (Gemma 2) and a logit scale; equals ``model(...).logits``."""
    cfg = getattr(model.config, "text_config", model.config)
    logits = model.get_output_embeddings()(hidden).float()
    scale = getattr(cfg, "logit_scale", None) or (1 / cfg.logits_scaling if getattr(cfg, "logits_scaling", None)
                                                  else None)
    if scale:
        logits = logits * scale
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _final_hidden(model: Any, ids: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
    """Final (normed) hidden states ``[b, t, d]``; the LM head is applied later, a chunk of positions at a time."""
    from saesteer.models import model_body

    return model_body(model)(input_ids=ids, attention_mask=att, use_cache=False).last_hidden_state


def _ce_kl_chunked(model: Any, hs: dict[str, torch.Tensor], ids: torch.Tensor, valid: torch.Tensor
                   ) -> dict[str, float]:
    """Summed next-token CE per pass in ``hs`` (clean / splice / zero final hidden states) and KL(clean ‖ pass) over
    the ``valid`` prediction positions, ``CE_CHUNK`` positions at a time (never the whole logits tensor)."""
    tgt = ids[:, 1:][valid]
    flat = {k: h[:, :-1][valid] for k, h in hs.items()}
    tot = {f"ce_{k}": 0.0 for k in hs} | {f"kl_{k}": 0.0 for k in hs if k != "clean"}
    for s in range(0, tgt.shape[0], CE_CHUNK):
        t = tgt[s:s + CE_CHUNK].unsqueeze(-1)
        ref = F.log_softmax(final_logits(model, flat["clean"][s:s + CE_CHUNK]), dim=-1)
        tot["ce_clean"] -= float(ref.gather(-1, t).sum())
        p_ref = ref.exp()
        for k in hs:
            if k == "clean":
                continue
            logp = F.log_softmax(final_logits(model, flat[k][s:s + CE_CHUNK]), dim=-1)
            tot[f"ce_{k}"] -= float(logp.gather(-1, t).sum())
            tot[f"kl_{k}"] += float((p_ref * (ref - logp)).sum())
            del logp
        del ref, p_ref
    return tot


@torch.inference_mode()
def evaluate_sae(model: Any, tok: Any, sae: Any, texts: list[str], layer: int, context_len: int = 256,
                 batch_size: int = 8, progress: bool = True, ce_docs: int | None = None) -> dict[str, Any]:
    """Metrics dict (see the module doc) for ``sae`` at ``layer`` of ``model`` on ``texts``.

    ``ce_docs``: only the first that many documents (rounded up to a whole batch) get the three full forward passes
    for CE / KL; the rest only feed the reconstruction and density statistics (forward stopped at the layer).
    """
    from saesteer.activations import keep_mask, pad_right
    from saesteer.models import hook_module, layer_output, replace_layer_output, run_to_layer, special_token_ids

    from .formats import check_compatible

    check_compatible(sae, model, layer)
    ensure(len(texts) > 0, "no held-out texts to evaluate on")
    dev = next(model.parameters()).device
    sae = sae.to(dev)
    special = special_token_ids(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    seqs = [s for s in (tok(t, add_special_tokens=False)["input_ids"][:context_len] for t in texts) if len(s) >= 2]
    ensure(seqs, "every held-out text is shorter than 2 tokens")
    mode: dict[str, Any] = {"kind": "clean", "mask": None, "h": None}

    def hook(_m: Any, _i: Any, out: Any) -> Any:
        if mode["kind"] == "off":
            return None
        h = layer_output(out)
        if mode["kind"] == "clean":
            mode["h"] = h.detach()
            return None
        m = mode["mask"].unsqueeze(-1)
        new = sae(h) if mode["kind"] == "splice" else torch.zeros_like(h)
        return replace_layer_output(out, torch.where(m, new.to(h.dtype), h))

    n_lat = sae.num_latents
    counts = torch.zeros(n_lat, dtype=torch.long)
    tot = {"sq_err": 0.0, "sum_x": torch.zeros(sae.d_in, dtype=torch.float64), "sum_sq": 0.0, "n": 0, "l0": 0.0,
           "ce_clean": 0.0, "ce_splice": 0.0, "ce_zero": 0.0, "kl_splice": 0.0, "kl_zero": 0.0, "n_pred": 0,
           "n_ce_docs": 0}
    handle = hook_module(model, layer).register_forward_hook(hook)
    try:
        with progress_bar(len(seqs), "sae-eval", unit="doc", enabled=progress) as bar:
            for i in range(0, len(seqs), batch_size):
                ids, att = pad_right(seqs[i:i + batch_size], pad)
                ids, att = ids.to(dev), att.to(dev)
                keep = keep_mask(ids, att, special)
                # predictions from position p (for token p+1) that can see a spliced position
                valid = (att[:, 1:].bool() & (keep.long().cumsum(-1)[:, :-1] > 0))
                mode.update(kind="clean", mask=keep)
                with_ce = ce_docs is None or i < ce_docs
                if with_ce:
                    hs = {"clean": _final_hidden(model, ids, att)}
                    x = mode["h"][keep].float()
                else:
                    mode["kind"] = "off"
                    x = run_to_layer(model, ids, att, layer)[keep].float()
                mode["h"] = None
                vals, idx = sae.encode(x)
                recon = sae.decode(vals, idx)
                tot["sq_err"] += float((x - recon).pow(2).sum())
                tot["sum_x"] += x.double().sum(0).cpu()
                tot["sum_sq"] += float(x.double().pow(2).sum())
                tot["n"] += x.shape[0]
                fired = vals > 0
                tot["l0"] += float(fired.sum())
                counts += torch.bincount(idx[fired].cpu(), minlength=n_lat)
                del x, recon, vals, idx, fired
                if with_ce:
                    for kind in ("splice", "zero"):
                        mode["kind"] = kind
                        hs[kind] = _final_hidden(model, ids, att)
                    for k, v in _ce_kl_chunked(model, hs, ids, valid).items():
                        tot[k] += v
                    del hs
                tot["n_pred"] += int(valid.sum()) if with_ce else 0
                tot["n_ce_docs"] += ids.shape[0] if with_ce else 0
                bar.update(ids.shape[0], tokens=int(att.sum()))
    finally:
        handle.remove()
    n, npred = tot["n"], max(tot["n_pred"], 1)
    ensure(n > 0, "no evaluable tokens (all special or first-of-document)")
    mean = tot["sum_x"] / n
    total_var = tot["sum_sq"] - n * float(mean.pow(2).sum())
    density = (counts.double() / n)
    ce_c, ce_s, ce_z = (tot[f"ce_{k}"] / npred for k in ("clean", "splice", "zero"))
    hist_edges = list(range(-8, 1))
    log_d = torch.log10(density[density > 0])
    hist = torch.histc(log_d, bins=len(hist_edges) - 1, min=-8, max=0).long().tolist() if log_d.numel() else []
    return {
        "n_tokens": n, "n_docs": len(seqs), "n_ce_docs": tot["n_ce_docs"], "n_ce_predictions": tot["n_pred"],
        "layer": layer, "num_latents": n_lat, "k": sae.k,
        "fvu": tot["sq_err"] / total_var if total_var > 0 else float("nan"),
        "mse": tot["sq_err"] / (n * sae.d_in), "l0": tot["l0"] / n,
        "dead_frac": float((counts == 0).double().mean()), "dense_frac": float((density > DENSE_THRESHOLD).double().mean()),
        "dense_threshold": DENSE_THRESHOLD,
        "ce_clean": ce_c, "ce_spliced": ce_s, "ce_zero_ablated": ce_z,
        "ce_loss_recovered": (ce_z - ce_s) / (ce_z - ce_c) if ce_z != ce_c else float("nan"),
        "kl_spliced": tot["kl_splice"] / npred, "kl_zero_ablated": tot["kl_zero"] / npred,
        "density_histogram": {"log10_density_edges": hist_edges, "counts": hist,
                              "dead": int((counts == 0).sum())},
        "_density": density,
    }


def plot_density(density: torch.Tensor, path: str | os.PathLike, title: str = "") -> Path:
    """Histogram of log10 feature density (dead latents shown in a separate bar at the left) as a PNG."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    live = density[density > 0]
    if live.numel():
        ax.hist(torch.log10(live).numpy(), bins=50, color="tab:blue")
    ax.bar([-8.5], [int((density == 0).sum())], width=0.4, color="tab:red", label="dead")
    ax.set_xlabel("log10 feature density (fraction of tokens)")
    ax.set_ylabel("latents")
    ax.set_title(title or "SAE feature density")
    ax.legend()
    fig.tight_layout()
    return atomic_write_bytes(path, figure_png(fig, dpi=110))


def run_sae_eval(cfg: SAEEvalConfig) -> dict[str, Any]:
    """Load model, SAE and texts, evaluate, write JSON (+ density PNG); returns the metrics."""
    from saesteer.core import resolve_device
    from saesteer.data import load_texts
    from saesteer.models import check_layer, load_model

    from .archs import load_sae

    set_threads(cfg.threads)
    sae = load_sae(cfg.sae)
    model, tok = load_model(cfg.model, device=resolve_device(cfg.device), dtype=cfg.model_dtype)
    layer = cfg.layer if cfg.layer is not None else sae.cfg.layer
    ensure(layer is not None and layer >= 0, "the SAE does not record its layer: pass --layer")
    layer = check_layer(model, layer)
    texts = load_texts(cfg.data, limit=cfg.max_docs, tok=tok)  # conversations get the chat template
    res = evaluate_sae(model, tok, sae, texts, layer, cfg.context_len, cfg.batch_size, ce_docs=cfg.ce_docs)
    density = res.pop("_density")
    out = Path(cfg.out)
    png = out.with_name(f"{out.stem}_density.png")
    plot_density(density, png, f"{Path(cfg.sae).name}: layer {layer}, {res['n_tokens']} tokens")
    res.update(config=asdict(cfg), density_png=str(png))
    atomic_write_json(out, {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in res.items()})
    return res
