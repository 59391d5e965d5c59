"""Single-stream variants that did not reach issue 17's goal, kept so the numbers in docs/RESULTS.md §4b can be rerun.

    SAESTEER_THREADS=2 flock /tmp/saesteer-cpu.lock .venv/bin/python benchmarks/single_stream.py

Same model, steering (``Add`` of a fixed random vector at layer 12), prompts and verdict workload as
``benchmarks/generation.py`` (64 XSTest prompts, prefix judge, 64-token budget, unsteered + steered, compared with
float32 row by row). Conditions: bf16 + other int4 layouts (groups of 32 on every projection; groups of 64 on the MLP
gate / up projections only, the rest int8), and ``torch.compile`` of the int8 model's forward as the decode loop offers
it (``GenerationConfig(compile=True)``; its compile time is measured). Saves ``benchmarks/results/single_stream.json``.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import generation as G  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from _common import run_command  # noqa: E402

from saesteer import models  # noqa: E402
from saesteer.core import atomic_write_json, set_threads  # noqa: E402
from saesteer.generation import GenerationConfig, generate_rows  # noqa: E402
from saesteer.steering import Add, steer  # noqa: E402

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LAYOUTS = {"int4 groups of 32, all projections (head int8)": (PROJ, 32),
           "int4 groups of 64, MLP gate/up only (rest int8)": (("gate_proj", "up_proj"), 64)}


def layout(base, int4_names, group):
    m = copy.deepcopy(base)
    models.quantize_model(m, "int4", int4_group=group, int4_names=int4_names)
    return m


def main() -> None:
    set_threads(2)
    res: dict = {"command": run_command(), "loadavg_at_start": os.getloadavg(), "model": models.DEFAULT_MODEL}
    base, tok = models.load_model(models.DEFAULT_MODEL, dtype="float32")
    vec = G.steering_vector(base, 4.0)
    prompts = G.eval_prompts()
    ref = G.verdicts(base, tok, prompts, 64, vec, 12)
    base.to(torch.bfloat16)
    for label, (names, group) in LAYOUTS.items():
        m = layout(base, names, group)
        v = G.verdicts(m, tok, prompts, 64, vec, 12)
        same = sum(a == b for k in ("unsteered", "steered") for a, b in zip(ref[k], v[k]))
        res[label] = {"verdicts_identical": same, "n": 128, "single_stream_steered": G.single_stream(
            m, tok, G.PROMPTS[:4], 48, vec, 12)}
        print(label, res[label], flush=True)
        del m
    models.quantize_model(base, "int8")

    def stream(compile_: bool) -> float:
        cfg = GenerationConfig(max_new_tokens=48, batch_size=1, eos_ids=[], compile=compile_)
        toks, t0 = 0, time.perf_counter()
        with steer(base, [Add(vector=vec, alpha=1.0, layer=12)]):
            for p in G.PROMPTS[:4]:
                toks += len(generate_rows(base, tok, [p], cfg)[0].out_ids)
        return round(toks / (time.perf_counter() - t0), 2)

    t0 = time.perf_counter()
    with steer(base, [Add(vector=vec, alpha=1.0, layer=12)]):
        generate_rows(base, tok, [G.PROMPTS[0]], GenerationConfig(max_new_tokens=8, batch_size=1, eos_ids=[],
                                                                 compile=True))
    res["torch_compile_int8"] = {"compile_warmup_seconds": round(time.perf_counter() - t0, 1),
                                 "compiled_tok_s": stream(True), "eager_tok_s": stream(False)}
    print("torch.compile", res["torch_compile_int8"], flush=True)
    res["loadavg_at_end"] = os.getloadavg()
    out = ROOT / "benchmarks" / "results" / "single_stream.json"
    atomic_write_json(out, res)
    print("wrote", out)


if __name__ == "__main__":
    main()
