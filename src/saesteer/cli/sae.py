"""``saesteer train`` (Top-k SAE on an activation cache; torchrun for data-parallel), ``saesteer sae-eval`` and
``saesteer sae export|import|info``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from saesteer.core import check_output_path, ensure

from ._app import app
from .options import DEVICE_HELP, MODEL_HELP, THREADS_HELP
from .presets import DTYPE_OPT, PRESET_OPT, from_preset

sae_app = typer.Typer(help="SAE files: export to / import from SAELens and sparsify, show a config.",
                      no_args_is_help=True)
app.add_typer(sae_app, name="sae")


@app.command("train")
def train_cmd(
    acts: Path = typer.Option(..., "--acts", help="activation cache folder (saesteer collect)"),
    out: Path = typer.Option(..., "--out", help="output SAE folder (checkpoints go to OUT/checkpoints)"),
    k: int = typer.Option(32, help="active latents per token"),
    expansion: int = typer.Option(8, help="num_latents = expansion × d_model"),
    num_latents: Optional[int] = typer.Option(None, help="dictionary size (overrides --expansion)"),
    batch_size: int = typer.Option(4096, help="global batch in tokens"),
    lr: Optional[float] = typer.Option(None, help="Adam LR (default 2e-4/sqrt(latents/2^14))"),
    warmup_steps: int = typer.Option(100, help="LR warm-up steps"),
    epochs: int = typer.Option(1, help="passes over the cache"),
    steps: Optional[int] = typer.Option(None, help="total steps (overrides --epochs)"),
    auxk_alpha: float = typer.Option(1 / 32, help="AuxK loss weight"),
    dead_window: int = typer.Option(250_000, help="tokens without firing after which a latent is dead"),
    seed: int = typer.Option(0),
    checkpoint_every: int = typer.Option(200, help="steps between checkpoints"),
    mm_dtype: str = typer.Option("auto", help="encoder matmul precision for top-k selection: float32 | bfloat16 | auto (bfloat16 on CUDA and on CPUs with AVX512-BF16 / AMX; values and gradients stay float32)"),
    model: Optional[str] = typer.Option(None, help="require the cache to come from this model"),
    layer: Optional[int] = typer.Option(None, help="require the cache to come from this layer"),
    resume: bool = typer.Option(False, "--resume", help="continue from OUT/checkpoints/state.pt"),
    overwrite: bool = typer.Option(False, "--overwrite", help="restart even if OUT holds a checkpoint or an SAE"),
    stop_at_step: Optional[int] = typer.Option(None, help="checkpoint and stop after this step (resume later)"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    preset: Optional[str] = PRESET_OPT,
) -> None:
    """Train a Top-k SAE (Gao et al. 2024) on cached activations. Data-parallel under
    ``torchrun --nproc_per_node N -m saesteer train ...``."""
    check_output_path(out)  # before any work: a bad path fails fast
    from saesteer.sae import TrainConfig, train

    if preset:  # the preset's k / expansion, and the cache must come from its model and layer
        from saesteer.steering import get_preset

        ensure(not get_preset(preset).public, f"preset {preset} uses a public SAE: nothing to train (saesteer "
                                              f"presets; use --sae with the other commands)")
        v = from_preset(preset, k=k, expansion=expansion, model=model, layer=layer)
        k, expansion, model, layer = v["k"], v["expansion"], v["model"], v["layer"]
    cfg = TrainConfig(acts=str(acts), out=str(out), k=k, expansion=expansion, num_latents=num_latents,
                      batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, epochs=epochs, steps=steps,
                      auxk_alpha=auxk_alpha, dead_window=dead_window, seed=seed, checkpoint_every=checkpoint_every,
                      mm_dtype=mm_dtype, model=model, layer=layer, resume=resume, overwrite=overwrite,
                      stop_at_step=stop_at_step, threads=threads, device=device, progress=progress)
    sae = train(cfg)
    summary = out / "train_summary.json"
    if sae is not None and summary.exists():
        s = json.loads(summary.read_text())
        typer.echo(f"saved {out}: fvu {s['fvu']:.4f}, dead {100 * s['dead_frac_final']:.1f}%, "
                   f"{s['tokens_per_s']:.0f} tokens/s")
    elif sae is None:
        typer.echo(f"stopped at step {stop_at_step}; continue with --resume")


@app.command("sae-eval")
def sae_eval_cmd(
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    sae: Path = typer.Option(..., "--sae", help="SAE folder (ours, SAELens or sparsify)"),
    data: str = typer.Option(..., "--data", help="held-out text spec"),
    out: Path = typer.Option(..., "--out", help="JSON output file"),
    layer: Optional[int] = typer.Option(None, help="layer (default: the SAE's)"),
    max_docs: int = typer.Option(64, help="documents to evaluate"),
    context_len: int = typer.Option(256, help="tokens per document"),
    batch_size: int = typer.Option(8, help="documents per forward"),
    ce_docs: Optional[int] = typer.Option(None, help="documents that also get CE/KL passes (default: all)"),
    dtype: Optional[str] = DTYPE_OPT,
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
) -> None:
    """FVU, MSE, L0, dead/dense latents, density histogram and CE loss recovered on held-out text."""
    check_output_path(out, "file")  # before any work: a bad path fails fast
    from saesteer.sae import SAEEvalConfig, run_sae_eval

    r = run_sae_eval(SAEEvalConfig(model=model, sae=str(sae), data=data, out=str(out), layer=layer,
                                   max_docs=max_docs, context_len=context_len, batch_size=batch_size,
                                   ce_docs=ce_docs, threads=threads, device=device,
                                   model_dtype=dtype or "auto"))
    typer.echo(f"fvu {r['fvu']:.4f}  L0 {r['l0']:.1f}  dead {100 * r['dead_frac']:.1f}%  "
               f"CE clean {r['ce_clean']:.3f} spliced {r['ce_spliced']:.3f} zero {r['ce_zero_ablated']:.3f}  "
               f"recovered {r['ce_loss_recovered']:.3f} → {out}")


@sae_app.command("export")
def export_cmd(
    sae_dir: Path = typer.Argument(..., help="SAE folder (any supported format)"),
    out: Path = typer.Argument(..., help="output folder"),
    to: str = typer.Option(..., "--to", help="saelens or sparsify"),
) -> None:
    """Write an SAE in SAELens or sparsify format (raw residual units, same latents)."""
    check_output_path(out, what="OUT")  # before any work: a bad path fails fast
    from saesteer.sae import export_saelens, export_sparsify, load_sae

    ensure(to in ("saelens", "sparsify"), f"--to must be saelens or sparsify, got {to!r}")
    sae = load_sae(sae_dir)
    path = export_saelens(sae, out) if to == "saelens" else export_sparsify(sae, out)
    typer.echo(f"wrote {to} SAE to {path}")


@sae_app.command("import")
def import_cmd(
    src: Path = typer.Argument(..., help="SAELens or sparsify Top-k SAE folder"),
    out: Path = typer.Argument(..., help="output folder (our format)"),
    model: Optional[str] = typer.Option(None, help="record this model name (if the source has none)"),
    layer: Optional[int] = typer.Option(None, help="record this layer (if the source has none)"),
) -> None:
    """Convert an SAELens / sparsify SAE into our format."""
    check_output_path(out, what="OUT")  # before any work: a bad path fails fast
    from saesteer.core import atomic_dir
    from saesteer.sae import TopKSAE, detect_format, load_sae, save_sae

    fmt, _ = detect_format(src)
    sae = load_sae(src)
    ensure(isinstance(sae, TopKSAE), f"only Top-k SAEs with unit-norm decoder rows convert to our format; this one "
                                     f"is {getattr(sae, 'arch', '?')} (steer with it directly: any command takes its path)")
    if model:
        sae.cfg.model = model
    if layer is not None:
        ensure(layer >= 0, f"--layer must be the absolute layer index here (no model to count from), got {layer}")
        sae.cfg.layer, sae.cfg.hook_name = layer, f"model.layers.{layer}"
    with atomic_dir(out) as tmp:
        save_sae(sae, tmp)
    typer.echo(f"imported {fmt} SAE ({sae.num_latents} latents, k={sae.k}, layer {sae.cfg.layer}) to {out}")


@sae_app.command("info")
def info_cmd(
    path: Path = typer.Argument(..., help="SAE folder or file (any supported layout; FOLDER:HOOKPOINT picks one)"),
    hookpoint: Optional[str] = typer.Option(None, "--hookpoint", help="which SAE of a folder holding several "
                                                                        "(sub-folder name, e.g. layers.5)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON (the summary plus the full config)"),
) -> None:
    """Print an SAE's architecture, width, hook point, layer, model and source."""
    from saesteer.sae import load_sae

    sae = load_sae(path, hookpoint=hookpoint)
    info = sae.info() if hasattr(sae, "info") else {}
    if as_json:
        cfg = sae.cfg.to_dict() if hasattr(sae.cfg, "to_dict") else {}
        typer.echo(json.dumps({"format": info.get("source"), **cfg, **info}, indent=2))
        return
    layer = info.get("layer", -1)
    rows = [("architecture", info.get("architecture")), ("width", f"{info.get('num_latents')} latents"),
            ("d_in", info.get("d_in"))]
    if info.get("k"):
        rows.append(("k", info.get("k")))
    rows += [("hook point", info.get("hook_name") or "(none recorded)"),
             ("layer", layer if layer is not None and layer >= 0 else "unknown"),
             ("model", info.get("model") or "unknown"), ("source", info.get("source")),
             ("path", info.get("path") or str(path)), ("dtype", info.get("dtype"))]
    for key, val in rows:
        typer.echo(f"{key:<13}{val}")
