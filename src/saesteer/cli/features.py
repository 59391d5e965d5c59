"""``saesteer features`` (refusal feature discovery + clamp grid + cards) and ``saesteer inspect`` (feature cards)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from saesteer.core import check_output_path, ensure

from ._app import app
from .common import load, split_floats, split_ints
from .options import DEVICE_HELP, THREADS_HELP, model_option
from .presets import DTYPE_OPT, PRESET_OPT, from_preset


def load_model_and_sae(model: str, sae: Path, device: str, threads: Optional[int], layer: Optional[int],
                       dtype: Optional[str] = None) -> tuple:
    """Load the model and the SAE and check that they belong together; returns ``(model, tok, sae, layer)``."""
    from saesteer.models import check_layer
    from saesteer.sae import load_sae, sae_path_exists
    from saesteer.steering import check_sae_compatible

    ensure(sae_path_exists(sae), f"SAE not found: {sae}")
    s = load_sae(sae)
    m, tok = load(model, device, threads, dtype)
    layer = check_layer(m, layer if layer is not None else s.require_layer())
    check_sae_compatible(s, m, layer)
    s.to(next(m.parameters()).device)
    return m, tok, s, layer


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


@app.command("features")
def features_cmd(
    model: str = model_option(),
    sae: Optional[Path] = typer.Option(None, help="SAE folder (any format; required unless --preset names a public SAE)"),
    out: Path = typer.Option(..., help="output folder (candidates/ranking/grid/selection JSON, cards)"),
    harmful: str = typer.Option("arditi-harmful", help="harmful prompt set (data spec)"),
    harmless: str = typer.Option("arditi-harmless", help="harmless prompt set (data spec)"),
    discovery_split: str = typer.Option("train", help="split for discovery ('' = whole set)"),
    val_split: str = typer.Option("val", help="split for the grid ('' = whole set; same as discovery: disjoint rows)"),
    n_archetypes: int = typer.Option(6, help="archetypal harmful prompts whose refusals give candidates"),
    n_contrast: int = typer.Option(24, help="harmful and harmless discovery prompts each (contrastive ranking)"),
    n_grid: int = typer.Option(6, help="top candidates entering the clamp grid"),
    n_grid_direction: int = typer.Option(2, help="latents of the whole dictionary closest to the harmful-harmless "
                                         "direction that also enter the grid"),
    features: str = typer.Option("", help="extra latents for the grid, comma-separated"),
    clamps: str = typer.Option("", help="absolute clamp values, comma-separated"),
    clamp_multiples: str = typer.Option("1,2,4", help="clamp values as multiples of each latent's max activation"),
    val_limit: int = typer.Option(24, help="harmful and harmless validation prompts each"),
    require_gain: bool = typer.Option(True, help="choose only clamps whose validation harmful-refusal gain has a "
                                      "95 % interval above 0 (--no-require-gain: the plain objective decides)"),
    max_new_tokens: int = typer.Option(20, help="new tokens per grid answer (prefix judge)"),
    discovery_tokens: int = typer.Option(24, help="new tokens per discovery answer"),
    layer: Optional[int] = typer.Option(None, help="layer to hook (default: the SAE's)"),
    batch_size: int = typer.Option(16, help="generation / encoding batch size"),
    n_cards: int = typer.Option(6, help="feature cards: the chosen latent, the control and the top candidates"),
    seed: int = typer.Option(0, help="seed of the shuffle when discovery and validation share a split"),
    heldout: str = typer.Option("advbench", help="harmful set for a final check on unused rows ('' = skip)"),
    heldout_limit: int = typer.Option(48, help="held-back prompts in that check"),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    dtype: Optional[str] = DTYPE_OPT,
    preset: Optional[str] = PRESET_OPT,
) -> None:
    """Find refusal latents (the paper's method + a contrastive ranking), pick one by a clamp grid, write cards."""
    check_output_path(out)  # before any work: a bad path fails fast
    from saesteer.core import atomic_dir, atomic_write_json, atomic_write_text
    from saesteer.features import DiscoveryConfig, discover, feature_cards, grid_table_html, write_cards

    v = from_preset(preset, model=model, sae=sae, layer=layer, clamps=clamps, dtype=dtype)
    model, sae, layer, clamps, dtype = v["model"], v["sae"], v["layer"], v["clamps"], v["dtype"]
    ensure(sae is not None, "give --sae (the obrien2024 preset trains its own: saesteer train --preset obrien2024)")
    cfg = DiscoveryConfig(
        harmful=harmful, harmless=harmless, discovery_split=discovery_split or None, val_split=val_split or None,
        n_archetypes=n_archetypes, n_contrast=n_contrast, discovery_tokens=discovery_tokens, n_grid=n_grid, n_grid_direction=n_grid_direction,
        features=tuple(split_ints(features, "--features")), clamps=tuple(split_floats(clamps, "--clamps")),
        clamp_multiples=tuple(split_floats(clamp_multiples, "--clamp-multiples")), val_limit=val_limit, require_gain=require_gain,
        max_new_tokens=max_new_tokens, batch_size=batch_size, layer=layer, seed=seed, heldout=heldout,
        heldout_limit=heldout_limit)
    con = _console()
    m, tok, s, cfg.layer = load_model_and_sae(model, sae, device, threads, layer, dtype)
    res = discover(m, tok, s, cfg, grid=True, progress=lambda msg: con.print(f"[saesteer] {msg}"))
    sel = res.selection
    chosen = [sel["feature"]] + ([sel["control"]] if sel.get("control") is not None else [])
    feats = list(dict.fromkeys(chosen + sel["grid_features"]))[: max(n_cards, len(chosen))]
    cards = feature_cards(m, tok, s, feats, res.seqs)
    for c in cards["cards"]:
        c["label"] = ("chosen" if c["feature"] == sel["feature"] else
                      "control" if c["feature"] == sel.get("control") else "candidate")
    with atomic_dir(out) as tmp:
        for name, obj in res.files().items():
            atomic_write_json(tmp / name, obj, indent=None if name == "ranking.json" else 2)
        for name, rows in (("answers.jsonl", res.answers), ("grid_answers.jsonl", res.grid_answers)):
            atomic_write_text(tmp / name, "".join(json.dumps(a) + "\n" for a in rows))
        write_cards(cards, tmp, title=f"refusal feature candidates — {model}, layer {cfg.layer}",
                    preamble=grid_table_html(res.grid))
    b, base = sel["best"], sel["baseline"]
    con.print(f"[saesteer] chosen latent {sel['feature']} clamp {sel['clamp']:g} ({sel['clamp_from']}): harmful "
              f"{b['harmful_refusal']['k']}/{b['harmful_refusal']['n']} (baseline {base['harmful_refusal']['k']}), "
              f"harmless {b['harmless_refusal']['k']}/{b['harmless_refusal']['n']} (baseline "
              f"{base['harmless_refusal']['k']}); control latent {sel.get('control')} → {out}")
    if not sel.get("gain_significant", True):
        con.print("[yellow][saesteer] no clamp in the grid raised validation harmful refusal significantly: the "
                  "choice above is the plain objective's; try larger --clamp-multiples or more --val-limit[/yellow]")
    if res.heldout:
        h = res.heldout
        con.print(f"[saesteer] held-back {heldout}: refusal {h['baseline']['k']}/{h['n']} → {h['steered']['k']}/{h['n']}"
                  f", diff {h['diff']:+.3f} (95 % CI {h['ci'][0]:+.3f}..{h['ci'][1]:+.3f}), McNemar p {h['mcnemar_p']:.2g}")


@app.command("inspect")
def inspect_cmd(
    model: str = model_option(),
    sae: Path = typer.Option(..., help="SAE folder (our format, SAELens or sparsify)"),
    features: str = typer.Option(..., help="latent indices, comma-separated"),
    data: str = typer.Option(..., help="texts or prompts (data spec); prompts are chat-formatted"),
    out: Path = typer.Option(..., help="output folder (cards.html, cards.json, hist_<f>.png)"),
    limit: int = typer.Option(200, help="at most this many texts (seeded sample)"),
    raw: bool = typer.Option(False, help="feed prompts as plain text, without the chat template"),
    max_tokens: int = typer.Option(256, help="cut texts to this many tokens"),
    n_contexts: int = typer.Option(8, help="top-activating contexts per feature"),
    layer: Optional[int] = typer.Option(None, help="layer to hook (default: the SAE's)"),
    batch_size: int = typer.Option(8, help="encoding batch size"),
    dtype: Optional[str] = DTYPE_OPT,
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
) -> None:
    """Feature cards: top contexts with token highlighting, activation histogram, promoted / suppressed tokens."""
    check_output_path(out)  # before any work: a bad path fails fast
    from saesteer.core import atomic_dir
    from saesteer.data import item_text, load_prompts
    from saesteer.features import CardConfig, encode_sequences, feature_cards, write_cards

    feats = tuple(split_ints(features, "--features"))
    items = load_prompts(data, limit=limit)
    ensure(len(items) > 0, f"{data}: no texts")
    m, tok, s, layer = load_model_and_sae(model, sae, device, threads, layer, dtype)
    s.check_features(feats)
    texts: list[Any] = []
    for it in items:  # conversations as formatted text; prompts as a chat turn (or plain text with --raw)
        t = item_text(it, tok)
        if t.strip():
            texts.append(t if raw or it.messages is not None else (t, None))
    ensure(len(texts) > 0, f"{data}: no non-empty texts")
    cfg = CardConfig(n_contexts=n_contexts, max_tokens=max_tokens, batch_size=batch_size)
    con = _console()
    con.print(f"[saesteer] encoding {len(texts)} texts at layer {layer}")
    seqs = encode_sequences(m, tok, s, layer, texts, batch_size=batch_size, max_tokens=max_tokens)
    cards = feature_cards(m, tok, s, feats, seqs, cfg)
    with atomic_dir(out) as tmp:
        write_cards(cards, tmp, title=f"feature cards — {model}, layer {layer}, {data}")
    con.print(f"[saesteer] {len(feats)} feature cards → {out / 'cards.html'}")
