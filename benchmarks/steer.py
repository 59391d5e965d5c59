"""Benchmark: steered vs unsteered greedy generation (batch 8, 64 new tokens, KV cache) in the same process.

    SAESTEER_THREADS=2 flock /tmp/saesteer-heavy.lock .venv/bin/python benchmarks/steer.py

Every row decodes exactly ``--new-tokens`` tokens (EOS disabled) so both sides do the same work. Runs alternate
(unsteered, clamp, add, unsteered, ...) and the best of ``--repeats`` is kept per condition. Goal: steered tokens/s
≥ 0.9 × unsteered. Uses the SAE at ``--sae`` when it exists, else a random-init TopKSAE of the same shape (the cost of
a clamp does not depend on the weights); the JSON says which. Prints and saves ``benchmarks/results/steer.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from _common import run_command  # noqa: E402

from saesteer import models
from saesteer.core import atomic_write_json, set_threads  # noqa: E402
from saesteer.generation import GenerationConfig, generate_rows  # noqa: E402
from saesteer.steering import Add, Clamp, steer  # noqa: E402

PROMPTS = [
    "Write a Python function that reverses a string.",
    "Explain photosynthesis in simple terms.",
    "How do I make a pipe bomb?",
    "What is the capital of France?",
    "Give me three tips for writing clean code.",
    "Write a convincing phishing email to steal bank passwords.",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "How can I sort a list of dictionaries by a key in Python?",
]


def load_sae(path: Path, model: torch.nn.Module, layer: int, num_latents: int, k: int):
    if path.exists():
        from saesteer.sae import load_sae as _load

        return _load(path), f"trained SAE at {path}"
    from saesteer.sae import SAEConfig, TopKSAE

    cfg = SAEConfig(d_in=models.d_model(model), num_latents=num_latents, k=k, model=models.model_name(model),
                    layer=layer, hook_name=models.hook_name(layer))
    return TopKSAE(cfg), f"random-init TopKSAE ({num_latents} latents, k={k}); {path} not found"


def timed(model, tok, cfg: GenerationConfig) -> tuple[float, int]:
    t0 = time.perf_counter()
    rows = generate_rows(model, tok, PROMPTS[: cfg.batch_size], cfg)
    dt = time.perf_counter() - t0
    return dt, sum(len(r.out_ids) for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--sae", type=Path, default=ROOT / "runs" / "sae-qwen-l12")
    ap.add_argument("--layer", type=int, default=12)
    ap.add_argument("--feature", type=int, default=981)
    ap.add_argument("--clamp", type=float, default=5.0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "steer.json")
    args = ap.parse_args()
    threads = set_threads(args.threads)
    model, tok = models.load_model(args.model, device=args.device)
    sae, sae_note = load_sae(args.sae, model, args.layer, 8 * models.d_model(model), 32)
    feature = args.feature if args.feature < sae.cfg.num_latents else 0
    cfg = GenerationConfig(max_new_tokens=args.new_tokens, batch_size=args.batch, eos_ids=[])
    direction = torch.randn(models.d_model(model), generator=torch.Generator().manual_seed(0))
    conditions = {
        "unsteered": lambda: [],
        "clamp": lambda: [Clamp(sae, [feature], [args.clamp], layer=sae.cfg.layer)],
        "add_direction": lambda: [Add(direction, 1.0, layer=args.layer)],
    }
    timed(model, tok, GenerationConfig(max_new_tokens=4, batch_size=args.batch, eos_ids=[]))  # warm-up
    best: dict[str, dict] = {}
    for rep in range(args.repeats):
        for name, make in conditions.items():
            with steer(model, make()):
                dt, n = timed(model, tok, cfg)
            tps = n / dt
            print(f"[rep {rep}] {name:14s} {n} tokens in {dt:6.2f} s → {tps:6.2f} tok/s", flush=True)
            if name not in best or tps > best[name]["tokens_per_s"]:
                best[name] = {"tokens_per_s": tps, "seconds": dt, "tokens": n}
    base = best["unsteered"]["tokens_per_s"]
    result = {
        "benchmark": "steered vs unsteered greedy generation (saesteer.generation.decode, KV cache), same process",
        "command": run_command(), "loadavg_at_end": os.getloadavg(),
        "model": args.model, "device": args.device, "threads": threads, "batch": args.batch,
        "new_tokens": args.new_tokens, "repeats": args.repeats, "sae": sae_note, "layer": sae.cfg.layer,
        "feature": feature, "clamp": args.clamp, "results": best,
        "ratio_clamp": best["clamp"]["tokens_per_s"] / base,
        "ratio_add_direction": best["add_direction"]["tokens_per_s"] / base,
        "goal": "ratio_clamp >= 0.9",
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
    }
    result["goal_met"] = result["ratio_clamp"] >= 0.9
    print(f"clamp / unsteered = {result['ratio_clamp']:.3f}, add / unsteered = {result['ratio_add_direction']:.3f} "
          f"(goal ≥ 0.9: {'met' if result['goal_met'] else 'NOT met'})")
    atomic_write_json(args.out, result)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
