"""Does single-stream quantization cost capability? HumanEval pass@1 of the default model in bf16, unquantized vs the
``-decode`` quantization modes (``models.quant``), on the same seeded problems.

    SAESTEER_THREADS=2 flock /tmp/saesteer-cpu.lock .venv/bin/python benchmarks/quant_capability.py

The reference is the unquantized bf16 model (batches of 8: the quantized layers are not used above 4 rows, so a
quantized model would decode the same way); each mode decodes one problem at a time (batch 1: every decode step
through the quantized weights, as ``chat`` / ``serve`` do for one user). Chat-formatted prompts, greedy, up to
``--max-new-tokens``, tests executed in the sandbox (``evals.capability``). Reports passes, the paired difference
(Newcombe interval, exact McNemar p) and how many replies are identical to the reference. Prints and saves
``benchmarks/results/quant_capability.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from _common import run_command  # noqa: E402

from saesteer import models  # noqa: E402
from saesteer.core import atomic_write_json, paired_summary, set_threads  # noqa: E402
from saesteer.data import load_humaneval  # noqa: E402
from saesteer.evals.capability import humaneval_pass  # noqa: E402
from saesteer.generation import GenerationConfig, generate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=24, help="seeded HumanEval problems")
    ap.add_argument("--modes", default="int4-decode,int8-decode")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quant_capability.json"))
    args = ap.parse_args()
    set_threads(args.threads)
    probs = load_humaneval(args.n, seed=0)
    msgs = [p["messages"] for p in probs]
    res: dict = {"command": run_command(), "loadavg_at_start": os.getloadavg(), "model": models.DEFAULT_MODEL,
                 "dtype": "bfloat16", "problems": [p["id"] for p in probs], "max_new_tokens": args.max_new_tokens}

    def run(quantize: str, batch: int) -> dict:
        model, tok = models.load_model(models.DEFAULT_MODEL, dtype="bfloat16", quantize=quantize)
        t0 = time.perf_counter()
        replies = generate(model, tok, msgs, GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=batch,
                                                              progress=True))
        secs = time.perf_counter() - t0
        passed = [r["passed"] for r in humaneval_pass(probs, replies)]
        return {"quantize": quantize, "batch_size": batch, "passed": sum(passed), "n": len(passed),
                "seconds": round(secs, 1), "per_problem": passed, "replies": replies}

    ref = run("none", 8)
    print("reference", ref["passed"], "/", ref["n"], flush=True)
    res["reference"] = {k: v for k, v in ref.items() if k != "replies"}
    for mode in args.modes.split(","):
        r = run(mode, 1)
        r["paired_vs_reference"] = paired_summary(r["per_problem"], ref["per_problem"])
        r["identical_replies"] = sum(a == b for a, b in zip(r.pop("replies"), ref["replies"]))
        res[mode] = r
        print(mode, r["passed"], "/", r["n"], "identical replies", r["identical_replies"], flush=True)
    res["loadavg_at_end"] = os.getloadavg()
    atomic_write_json(args.out, res)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
