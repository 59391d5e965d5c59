"""``saesteer generate``, ``saesteer chat`` (steered, optionally side by side with unsteered) and ``saesteer direction``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional

import typer

from saesteer.core import check_output_path, ensure

from ._app import app
from .common import load, split_ints
from .options import DEVICE_HELP, THREADS_HELP, SteeringOptions, model_option, steering_options
from .presets import DTYPE_OPT, PRESET_OPT, QUANTIZE_AUTO_OPT, QUANTIZE_OPT, from_preset


def _preset_steering(preset: Optional[str], model: str, sae: Any, feature: Any, clamp: Any, alpha: Any, layer: Any,
                     dtype: Optional[str]) -> tuple:
    """generate / chat: fill model, dtype, layer and — when features are given — the preset's SAE and first clamp."""
    if not preset:
        return model, sae, clamp, layer, dtype
    keys: dict[str, Any] = dict(model=model, dtype=dtype)
    if feature:
        keys.update(sae=sae, layer=layer)
        if alpha is None:
            keys.update(clamp=clamp)
    v = {**dict(sae=sae, clamp=clamp, layer=layer), **from_preset(preset, **keys)}
    return v["model"], v["sae"], v["clamp"], v["layer"], v["dtype"]


def run_generation(model: Any, tok: Any, prompts: list, max_new_tokens: int, system: Optional[str] = None,
                   batch_size: int = 8) -> list[str]:
    """Greedy completions with whatever hooks are on the model."""
    from saesteer.generation import GenerationConfig, generate

    return generate(model, tok, prompts, GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size,
                                                          system=system))


_GEN_STEERING = ("sae", "feature", "clamp", "alpha", "direction", "ablate_direction", "layer", "positions", "spec",
                 "policy")


@app.command("generate")
@steering_options(*_GEN_STEERING, short=True)
def generate_cmd(
    prompts: List[str] = typer.Argument(..., help="prompt(s) to answer"),
    model: str = model_option(),
    steering: SteeringOptions = None,  # type: ignore[assignment]  (filled by @steering_options)
    compare: bool = typer.Option(False, "--compare", help="also print the unsteered answer"),
    max_new_tokens: int = typer.Option(64, help="tokens to generate per answer"),
    system: Optional[str] = typer.Option(None, help="system prompt"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object per prompt"),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    dtype: Optional[str] = DTYPE_OPT,
    quantize: str = QUANTIZE_OPT,
    preset: Optional[str] = PRESET_OPT,
) -> None:
    """Answer prompts greedily with SAE-feature or refusal-direction steering (no steering options: plain model)."""
    from saesteer.steering import as_steering

    ensure(max_new_tokens > 0, "--max-new-tokens must be positive")
    model, steering.sae, steering.clamp, steering.layer, dtype = _preset_steering(
        preset, model, steering.sae, steering.feature, steering.clamp, steering.alpha, steering.layer, dtype)
    st = as_steering(steering.to_steering())
    specs = st.specs
    m, tok = load(model, device, threads, dtype, quantize)
    with st.context(m):
        steered = run_generation(m, tok, list(prompts), max_new_tokens, system)
    plain = run_generation(m, tok, list(prompts), max_new_tokens, system) if compare else None
    for i, p in enumerate(prompts):
        if as_json:
            rec = {"prompt": p, "steering": [s.to_dict() for s in specs], "answer": steered[i]}
            if plain is not None:
                rec["unsteered"] = plain[i]
            typer.echo(json.dumps(rec))
        elif plain is None:
            typer.echo(steered[i] if len(prompts) == 1 else f"### {p}\n{steered[i]}\n")
        else:
            typer.echo(f"### {p}\n--- steered ---\n{steered[i]}\n--- unsteered ---\n{plain[i]}\n")


@app.command("chat")
@steering_options(*_GEN_STEERING, short=True)
def chat_cmd(
    model: str = model_option(),
    steering: SteeringOptions = None,  # type: ignore[assignment]  (filled by @steering_options)
    side_by_side: bool = typer.Option(False, "--side-by-side", help="show steered and unsteered answers together"),
    max_new_tokens: int = typer.Option(128, help="tokens per answer"),
    system: Optional[str] = typer.Option(None, help="system prompt"),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    dtype: Optional[str] = DTYPE_OPT,
    quantize: str = QUANTIZE_AUTO_OPT,
    preset: Optional[str] = PRESET_OPT,
) -> None:
    """Interactive chat with the steered model (``/reset`` clears the history, ``/exit`` or EOF quits)."""
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table

    from saesteer.steering import as_steering

    ensure(max_new_tokens > 0, "--max-new-tokens must be positive")
    model, steering.sae, steering.clamp, steering.layer, dtype = _preset_steering(
        preset, model, steering.sae, steering.feature, steering.clamp, steering.alpha, steering.layer, dtype)
    st = as_steering(steering.to_steering())
    m, tok = load(model, device, threads, dtype, quantize)
    con = Console()
    label = st.name if (st.specs or st.policy is not None) else "none"
    dt = str(next(m.parameters()).dtype).removeprefix("torch.")
    qm = getattr(m, "saesteer_quantize", "none")
    q = f" · {qm} weights" if qm != "none" else ""
    con.print(f"[bold]saesteer chat[/] · {model} · {dt}{q} · steering: {label} · /reset, /exit")
    hist_s: list[dict[str, str]] = []
    hist_u: list[dict[str, str]] = []
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            hist_s, hist_u = [], []
            con.print("[dim]history cleared[/]")
            continue
        hist_s.append({"role": "user", "content": text})
        with st.context(m):
            ans_s = run_generation(m, tok, [hist_s], max_new_tokens, system, batch_size=1)[0]
        hist_s.append({"role": "assistant", "content": ans_s})
        if not side_by_side:
            con.print(Panel(ans_s, title="steered" if st.specs or st.policy is not None else "model", title_align="left"))
            continue
        hist_u.append({"role": "user", "content": text})
        ans_u = run_generation(m, tok, [hist_u], max_new_tokens, system, batch_size=1)[0]
        hist_u.append({"role": "assistant", "content": ans_u})
        table = Table(show_lines=True, expand=True)
        table.add_column("steered")
        table.add_column("unsteered")
        table.add_row(ans_s, ans_u)
        con.print(table)


def _split_prompts(spec: str, n_train: int, n_val: int, seed: int) -> tuple[list, list]:
    """Disjoint train / val prompts: the set's own train / val splits when it has them, else a seeded split."""
    import random

    from saesteer.data import load_prompts

    def texts(items: list) -> list:
        return [it.messages if it.messages is not None else it.prompt for it in items]

    if spec.split(":")[0] in ("arditi-harmful", "arditi-harmless") and ":" not in spec:
        return (texts(load_prompts(spec, split="train", limit=n_train, seed=seed)),
                texts(load_prompts(spec, split="val", limit=n_val, seed=seed)))
    items = load_prompts(spec)
    ensure(len(items) >= 2, f"{spec}: need at least 2 prompts for a train / val split, got {len(items)}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = min(n_val, max(1, len(items) // 4))
    val, train = order[:n_val], order[n_val:n_val + n_train]
    return texts([items[i] for i in sorted(train)]), texts([items[i] for i in sorted(val)])


@app.command("direction")
def direction_cmd(
    out: Path = typer.Option(..., help="output file (.safetensors; a .json sidecar is written next to it)"),
    model: str = model_option(),
    harmful: str = typer.Option("arditi-harmful", help="harmful prompt set (data spec)"),
    harmless: str = typer.Option("arditi-harmless", help="harmless prompt set (data spec)"),
    n_train: int = typer.Option(64, help="prompts per class for the means"),
    n_val: int = typer.Option(16, help="prompts per class for choosing the layer"),
    layers: Optional[str] = typer.Option(None, help="candidate layers, comma-separated (default: 25-75 %% depth, step 2)"),
    position: str = typer.Option("last", help="last (last post-instruction token) or mean (over them)"),
    alpha: float = typer.Option(1.0, help="addition coefficient used to score candidates"),
    batch_size: int = typer.Option(8, help="prompts per forward"),
    seed: int = typer.Option(0, help="sampling seed"),
    dtype: Optional[str] = DTYPE_OPT,
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
) -> None:
    """Fit the refusal direction (difference of means, Arditi et al.) and pick its layer on a validation split."""
    check_output_path(out, "file")  # before any work: a bad path fails fast
    from saesteer.steering import DirectionConfig, fit_direction, save_direction

    ensure(n_train > 0 and n_val > 0, "--n-train and --n-val must be positive")
    cand = split_ints(layers, "--layers") or None
    cfg = DirectionConfig(layers=cand, position=position, alpha=alpha, batch_size=batch_size)
    h_tr, h_val = _split_prompts(harmful, n_train, n_val, seed)
    s_tr, s_val = _split_prompts(harmless, n_train, n_val, seed)
    m, tok = load(model, device, threads, dtype)
    d, meta = fit_direction(m, tok, h_tr, s_tr, h_val, s_val, cfg, progress=True)
    path = save_direction(d, out, data={"harmful": harmful, "harmless": harmless, "seed": seed})
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"refusal direction candidates ({model})")
    for c in ("layer", "norm", "induce", "bypass", "score"):
        t.add_column(c, justify="right")
    for c in meta["candidates"]:
        mark = " *" if c["layer"] == d.layer else ""
        t.add_row(f"{c['layer']}{mark}", f"{c['norm']:.2f}", f"{c['induce']:+.2f}", f"{c['bypass']:+.2f}",
                  f"{c['score']:+.2f}")
    con = Console(stderr=True)
    con.print(t)
    con.print(f"chosen layer {d.layer}, norm {d.norm:.2f} → {path}")
