"""Where a decode step goes: the model's Linear layers alone vs a whole KV-cache decode step, by rows per step.

    SAESTEER_THREADS=2 .venv/bin/python benchmarks/decode_step.py

For M rows (a decode step of a batch of M) it times every ``nn.Linear`` of the model applied to an ``[M, in]``
input (the GEMMs a step must do, LM head included) and a real decode step of ``model(...)`` with a KV cache of
~40 tokens, and reports the GEMM throughput (GFLOP/s) next to a large square matmul's. Prints and saves
``benchmarks/results/decode_step.json``. This explains the generation benchmark: batching is the lever, because
small-M fp32 GEMMs run far below the machine's peak.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from _common import decode_step_fn, run_command  # noqa: E402

from saesteer import models
from saesteer.core import atomic_write_json, set_threads  # noqa: E402


def _time(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--rows", default="1,8,32,64,128")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("SAESTEER_THREADS", "2")))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode_step.json"))
    args = ap.parse_args()
    set_threads(args.threads)
    model, tok = models.load_model(args.model, dtype="float32")  # the fp32 GEMMs this benchmark is about
    lins = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    n_lin = sum(m.weight.numel() for m in lins)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    peak = 2 * 2048**3 / _time(lambda: a @ b, 5) / 1e9
    res = {"command": run_command(), "model": args.model, "threads": args.threads, "loadavg_at_start": os.getloadavg(),
           "linear_params": n_lin, "square_matmul_gflops": round(peak, 1), "rows": []}
    print(f"{len(lins)} Linear layers, {n_lin / 1e6:.0f}M weights; 2048² matmul {peak:.0f} GFLOP/s", flush=True)
    for M in (int(x) for x in args.rows.split(",")):
        xs = {m.in_features: torch.randn(M, m.in_features) for m in lins}
        t_lin = _time(lambda xs=xs: [m(xs[m.in_features]) for m in lins], args.reps)
        t_step = _time(decode_step_fn(model, tok, M), args.reps)
        row = {"rows": M, "linears_ms": round(t_lin * 1e3, 1), "decode_step_ms": round(t_step * 1e3, 1),
               "linear_share_of_step": round(t_lin / t_step, 2),
               "linear_gflops": round(2 * M * n_lin / t_lin / 1e9, 1), "tok_s_ceiling_from_step": round(M / t_step, 1)}
        res["rows"].append(row)
        print(row, flush=True)
    atomic_write_json(args.out, res)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
