"""Benchmark: the kernels of a one-row decode step, per projection shape of the default model (issue 17).

    SAESTEER_THREADS=2 flock /tmp/saesteer-cpu.lock .venv/bin/python benchmarks/step_kernels.py

For each projection shape of a model config (fused q/k/v, o, fused gate/up, down; ``--layers`` distinct random
weights per shape, as many as the model has layers, so the weights stream from memory as in a real step): the time of
one-row products through ``F.linear`` on bf16, through the same bf16 weights reordered once for oneDNN
(``models.packed.PackedLinear``) and through torch's weight-only int8 kernel (``models.quant.Int8Linear``), and
whether the packed products are bit-identical to ``F.linear``'s. Also: argmax over one vocabulary row of logits in bf16
and in fp32 (the decode loop's greedy pick). Prints and saves ``benchmarks/results/step_kernels.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from _common import run_command  # noqa: E402

from saesteer.core import atomic_write_json, set_threads  # noqa: E402
from saesteer.models import Int8Linear, PackedLinear, packing_supported  # noqa: E402


def timed(calls, reps: int) -> float:
    """Milliseconds for one pass over ``calls`` (best of ``reps`` passes after a warm-up pass)."""
    for f in calls:
        f()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for f in calls:
            f()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=896, help="default model (Qwen2.5-Coder-0.5B): 896")
    ap.add_argument("--intermediate", type=int, default=4864)
    ap.add_argument("--kv-dim", type=int, default=128, help="width of k and v (2 kv heads x 64)")
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "step_kernels.json"))
    args = ap.parse_args(argv)
    set_threads(args.threads)
    can_pack = packing_supported()
    h, i = args.hidden, args.intermediate
    shapes = {"qkv (fused)": (h + 2 * args.kv_dim, h), "o": (h, h), "gate/up (fused)": (2 * i, h), "down": (h, i)}
    res: dict = {"command": run_command(), "loadavg_at_start": os.getloadavg(), "torch": torch.__version__,
                 "threads": args.threads, "layers": args.layers, "packing_supported": can_pack, "shapes": {}}
    g = torch.Generator().manual_seed(0)
    totals = {"F.linear bf16": 0.0, "packed bf16": 0.0, "int8": 0.0}
    for name, (n_out, n_in) in shapes.items():
        lins = []
        for _ in range(args.layers):
            lin = nn.Linear(n_in, n_out, bias=False, dtype=torch.bfloat16)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(n_out, n_in, generator=g) * 0.02)
            lins.append(lin)
        x = torch.randn(1, n_in, generator=g).bfloat16()
        row: dict = {"out": n_out, "in": n_in}
        with torch.inference_mode():
            row["F.linear bf16"] = timed([lambda m=m, x=x: m(x) for m in lins], args.reps)
            if can_pack:
                packed = [PackedLinear(m) for m in lins]
                row["packed bf16"] = timed([lambda m=m, x=x: m(x) for m in packed], args.reps)
                row["packed_bit_identical"] = all(torch.equal(p(x), m(x)) for p, m in zip(packed, lins))
                del packed
            q8 = [Int8Linear(m) for m in lins]
            row["int8"] = timed([lambda m=m, x=x: m(x) for m in q8], args.reps)
        for k in totals:
            totals[k] += row.get(k, 0.0)
        res["shapes"][name] = {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}
        print(name, res["shapes"][name], flush=True)
    res["per_step_ms"] = {k: round(v, 2) for k, v in totals.items()}
    logits = torch.randn(1, args.vocab, generator=g)
    for dt in (torch.bfloat16, torch.float32):
        lg = logits.to(dt)
        res[f"argmax_ms_{str(dt).split('.')[1]}"] = round(timed([lambda lg=lg: lg.argmax(-1)] * 50, args.reps) / 50, 4)
    lb = logits.bfloat16()
    res["argmax_ms_bf16_upcast_first"] = round(timed([lambda: lb.float().argmax(-1)] * 50, args.reps) / 50, 4)
    res["loadavg_at_end"] = os.getloadavg()
    print({k: v for k, v in res.items() if k != "shapes"})
    atomic_write_json(args.out, res)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
