"""Benchmark: a gated policy's comparison time with and without reusing the unsteered answers (issue 15 §5).

    SAESTEER_THREADS=2 flock /tmp/saesteer-cpu.lock .venv/bin/python benchmarks/compare_reuse.py \\
        --policy runs/s9/spread/policies/probe-last.json

``saesteer compare`` on the default model: the unsteered condition and one gated policy on a refusal set (harmful and
benign prompts) and seeded HumanEval problems, run twice in one process on the same model object — with
``reuse_unsteered`` (the gated condition takes the unsteered answers for every row its gate leaves untouched) and
without (the peer: every row regenerated under the policy). Reports the gated condition's seconds per group in both
runs, the answers served, and whether every metric (rate, k, n, gate fire rate) is the same. Prints and saves JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from _common import run_command  # noqa: E402

from saesteer.core import atomic_write_json, set_threads  # noqa: E402
from saesteer.experiments import CompareConfig, run_compare  # noqa: E402
from saesteer.models import DEFAULT_MODEL, load_model  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--policy", required=True, help="a gated policy file of the model")
    ap.add_argument("--unsafe", default="jbb-harmful")
    ap.add_argument("--safe", default="jbb-benign")
    ap.add_argument("--limit", type=int, default=40, help="prompts per refusal set")
    ap.add_argument("--humaneval", type=int, default=16, help="seeded HumanEval problems (0 = none)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("SAESTEER_THREADS", "2")))
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compare_reuse.json"))
    args = ap.parse_args(argv)
    set_threads(args.threads)
    model, tok = load_model(args.model, dtype=args.dtype or "auto")
    load_start = os.getloadavg()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for reuse in (True, False):
            cfg = CompareConfig(policies=[args.policy], out=str(Path(tmp) / f"reuse-{reuse}"), unsafe=[args.unsafe],
                                safe=[args.safe], limit=args.limit, multiturn=False,
                                capability=["humaneval"] if args.humaneval else [], gsm8k_limit=args.humaneval or None,
                                batch_size=args.batch_size, broken=False, reuse_unsteered=reuse,
                                unsteered=True, progress=True)
            if not reuse:  # the unsteered condition was already run: copy its rows so only the policy reruns
                src, dst = Path(tmp) / "reuse-True", Path(cfg.out)
                shutil.copytree(src / "conditions" / "unsteered", dst / "conditions" / "unsteered")
                rows = [json.loads(x) for x in (src / "results.jsonl").read_text().splitlines()]
                (dst / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows
                                                           if r["condition"] == "unsteered"))
            t0 = time.perf_counter()
            rows = run_compare(model, tok, cfg, say=lambda s: print(s, file=sys.stderr))
            runs[reuse] = {"seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    cond = next(r["condition"] for r in runs[True]["rows"] if r["condition"] != "unsteered")

    def gated(reuse: bool) -> dict:
        out = {}
        for r in runs[reuse]["rows"]:
            if r["condition"] == cond:
                out[r["metric"]] = {k: r.get(k) for k in ("group", "rate", "k", "n", "gate_fire_rate", "seconds_group",
                                                         "reused_answers")}
        return out

    on, off = gated(True), gated(False)
    same = all(on[m][k] == off[m][k] for m in on for k in ("rate", "k", "n", "gate_fire_rate"))
    group_s = {g: {"reuse": next((v["seconds_group"] for v in on.values() if v["group"] == g), None),
                   "no_reuse": next((v["seconds_group"] for v in off.values() if v["group"] == g), None)}
               for g in dict.fromkeys(v["group"] for v in on.values())}
    tot_on = sum(v["reuse"] or 0 for v in group_s.values())
    tot_off = sum(v["no_reuse"] or 0 for v in group_s.values())
    res = {"benchmark": "compare_reuse", "command": run_command(), "model": args.model, "policy": args.policy,
           "condition": cond, "dtype": str(next(model.parameters()).dtype), "threads": args.threads,
           "cpu": platform.processor() or platform.machine(), "load_avg_start_end": [load_start, os.getloadavg()],
           "sets": {"unsafe": args.unsafe, "safe": args.safe, "limit": args.limit, "humaneval": args.humaneval},
           "seconds_per_group": group_s, "gated_seconds": {"reuse": tot_on, "no_reuse": tot_off},
           "speedup": round(tot_off / tot_on, 2) if tot_on else None, "metrics_identical": same,
           "metrics": {"reuse": on, "no_reuse": off}}
    print(json.dumps({k: res[k] for k in ("condition", "dtype", "seconds_per_group", "gated_seconds", "speedup",
                                          "metrics_identical")}, indent=1))
    for m in on:
        print(f"{m:>16}: fire {on[m]['gate_fire_rate']}, served {on[m]['reused_answers']} of {on[m]['n']}, "
              f"rate {on[m]['rate']} vs {off[m]['rate']}")
    atomic_write_json(args.out, res)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
