"""Where int8 weights pay: one decode step's linears and a whole decode step, bf16 vs weight-only int8, by rows.

    SAESTEER_THREADS=2 flock /tmp/saesteer-cpu.lock .venv/bin/python benchmarks/int8_rows.py

For M rows (a decode step of M sequences) it times every linear layer of the default model applied to an ``[M, in]``
input — the model's own bf16 weights vs the ``int8-decode`` layers of ``models.quant`` forced to their int8 path at
every M (q/k/v and gate/up fused, the LM head rescored from int4) — and a real KV-cache decode step of each model (best of ``--reps`` runs of ``--steps`` steps).
torch's packed int8 kernel re-reads its weights for every row, so int8 wins only for a few rows: the largest M where
the int8 step is faster is what ``models.quant.DECODE_ROWS`` (the ``int8-decode`` cut-over) should be. A profile of
one-row int8 steps splits the step into the quantized kernels and everything else. Prints and saves
``benchmarks/results/int8_rows.json``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from _common import decode_step_fn, run_command  # noqa: E402

from saesteer import models  # noqa: E402
from saesteer.core import atomic_write_json, set_threads  # noqa: E402
from saesteer.models.quant import DECODE_ROWS, FusedLinears, Int4Linear, Int8Linear, RescoredHead  # noqa: E402


def _best(fn, reps: int, inner: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def _layers(model) -> list:
    """The matmul layers of a step: every nn.Linear / quantized layer outside a fused group, and each fused group."""
    kinds = (torch.nn.Linear, Int8Linear, Int4Linear, RescoredHead, FusedLinears)
    out, inside = [], set()
    for m in model.modules():
        if id(m) in inside or not isinstance(m, kinds):
            continue
        if isinstance(m, (FusedLinears, RescoredHead)):
            inside |= {id(x) for x in m.modules()}
        out.append(m.layer if isinstance(m, FusedLinears) else m)
    return out


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--rows", default="1,2,3,4,6,8")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("SAESTEER_THREADS", "2")))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "int8_rows.json"))
    args = ap.parse_args()
    set_threads(args.threads)
    dense, tok = models.load_model(args.model, dtype="bfloat16")
    q8 = copy.deepcopy(dense)  # int8-decode's layers (the LM head rescored from int4), forced to int8 at every M
    models.quantize_model(q8, "int8-decode")
    for m in q8.modules():
        if isinstance(m, (Int8Linear, RescoredHead)):
            m.max_rows = 1 << 30
    res = {"command": run_command(), "model": args.model, "threads": args.threads, "loadavg_at_start": os.getloadavg(),
           "decode_rows_in_code": DECODE_ROWS, "rows": []}
    for M in (int(x) for x in args.rows.split(",")):
        row = {"rows": M}
        for name, m in (("bf16", dense), ("int8", q8)):
            lays = _layers(m)
            xs = {lay.in_features: torch.randn(M, lay.in_features, dtype=torch.bfloat16) for lay in lays}
            run = lambda lays=lays, xs=xs: [lay(xs[lay.in_features]) for lay in lays]  # noqa: E731
            row[f"{name}_linears_ms"] = round(_best(run, args.reps, 3) * 1e3, 2)
            row[f"{name}_step_ms"] = round(_best(decode_step_fn(m, tok, M), args.reps, args.steps) * 1e3, 2)
        row["int8_over_bf16_step"] = round(row["int8_step_ms"] / row["bf16_step_ms"], 2)
        res["rows"].append(row)
        print(row, flush=True)
    wins = [r["rows"] for r in res["rows"] if r["int8_step_ms"] < r["bf16_step_ms"]]
    res["largest_rows_where_int8_wins"] = max(wins) if wins else 0
    from torch.profiler import ProfilerActivity, profile

    step = decode_step_fn(q8, tok, 1)
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    ev = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(ev.values())
    quant = sum(v for k, v in ev.items() if "int8pack" in k or "int4pack" in k)
    top = sorted(ev.items(), key=lambda kv: -kv[1])[:12]
    res["profile_one_row_int8"] = {
        "steps": args.steps, "self_cpu_ms_per_step": round(total / 1e3 / args.steps, 2),
        "quantized_kernels_share": round(quant / total, 3),
        "top_ops_ms_per_step": {k: round(v / 1e3 / args.steps, 3) for k, v in top}}
    print(res["profile_one_row_int8"], flush=True)
    res["loadavg_at_end"] = os.getloadavg()
    atomic_write_json(args.out, res)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
