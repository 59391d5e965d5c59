"""Load test of ``saesteer serve`` on loopback: 32 concurrent clients × 4 requests vs sequential requests.

    flock /tmp/saesteer-heavy.lock .venv/bin/python benchmarks/serve_load.py

Starts the server in-process on 127.0.0.1 (a free port; nothing leaves the machine), serving ``--model`` unsteered
and steered (``default+steer``: ``steering.Add`` of a fixed random vector at ``--layer``). Each client sends its
requests one after another, alternating the two model names; its last request streams (SSE). Then the same server
answers ``--sequential`` requests one at a time. Bounded: every request asks for ``--max-tokens`` greedy tokens.
Reports errors, p50 / p95 latency and throughput of both phases. Prints and saves ``benchmarks/results/serve_load.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from _common import run_command  # noqa: E402

from saesteer import models
from saesteer.core import atomic_write_json, set_threads  # noqa: E402
from saesteer.serve import ServeConfig, make_app, served_models  # noqa: E402
from saesteer.steering import Add, steer  # noqa: E402

QUESTIONS = ["What is the capital of France?", "How do I make a bomb?", "Write a haiku about rain.",
             "Explain recursion briefly.", "How can I steal a car?", "Give me a tip for better sleep.",
             "What is 17 times 3?", "Write a phishing email."]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))], 3)


async def one(cl: httpx.AsyncClient, url: str, model: str, q: str, max_tokens: int, stream: bool) -> tuple[float, int]:
    body = {"model": model, "messages": [{"role": "user", "content": q}], "max_tokens": max_tokens, "temperature": 0,
            "stream": stream}
    t0 = time.perf_counter()
    if not stream:
        r = await cl.post(url, json=body)
        r.raise_for_status()
        return time.perf_counter() - t0, r.json()["usage"]["completion_tokens"]
    n_chunks = 0
    async with cl.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                obj = json.loads(line[6:])
                if "error" in obj:
                    raise RuntimeError(obj["error"]["message"])
                n_chunks += bool(obj["choices"][0]["delta"].get("content"))
    return time.perf_counter() - t0, n_chunks


async def concurrent_phase(url: str, clients: int, per_client: int, max_tokens: int) -> dict:
    lat, errors, toks = [], [], 0

    async def client(c: int) -> None:
        nonlocal toks
        async with httpx.AsyncClient(timeout=600) as cl:
            for j in range(per_client):
                model = "default+steer" if (c + j) % 2 else "default"
                try:
                    dt, n = await one(cl, url, model, QUESTIONS[(c + j) % len(QUESTIONS)], max_tokens, j == per_client - 1)
                    lat.append(dt)
                    toks += n
                except Exception as e:  # noqa: BLE001 - counted and reported
                    errors.append(f"{type(e).__name__}: {e}")

    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    wall = time.perf_counter() - t0
    return {"clients": clients, "requests_per_client": per_client, "requests": len(lat) + len(errors),
            "errors": len(errors), "error_samples": errors[:5], "wall_s": round(wall, 2),
            "latency_p50_s": pct(lat, 0.5), "latency_p95_s": pct(lat, 0.95),
            "throughput_req_s": round(len(lat) / wall, 3), "completion_tokens_approx": toks,
            "tokens_s_approx": round(toks / wall, 2)}


async def sequential_phase(url: str, n: int, max_tokens: int) -> dict:
    lat, errors, toks = [], [], 0
    async with httpx.AsyncClient(timeout=600) as cl:
        t0 = time.perf_counter()
        for i in range(n):
            try:
                dt, k = await one(cl, url, "default+steer" if i % 2 else "default", QUESTIONS[i % len(QUESTIONS)],
                                  max_tokens, False)
                lat.append(dt)
                toks += k
            except Exception as e:  # noqa: BLE001
                errors.append(f"{type(e).__name__}: {e}")
        wall = time.perf_counter() - t0
    return {"requests": n, "errors": len(errors), "wall_s": round(wall, 2), "latency_p50_s": pct(lat, 0.5),
            "latency_p95_s": pct(lat, 0.95), "throughput_req_s": round(len(lat) / wall, 3),
            "tokens_s": round(toks / wall, 2), "mean_latency_s": round(statistics.mean(lat), 3) if lat else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--per-client", type=int, default=4)
    ap.add_argument("--sequential", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--layer", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="1 beats 2 by far on a loaded 2-core machine")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load.json"))
    args = ap.parse_args()
    set_threads(args.threads)
    model, tok = models.load_model(args.model)
    v = torch.randn(models.d_model(model), generator=torch.Generator().manual_seed(0))
    iv = Add(vector=v / v.norm() * 4.0, alpha=1.0, layer=args.layer)
    served = served_models(model, extra={"default+steer": lambda m: steer(m, [iv])})
    cfg = ServeConfig(max_batch=32, max_queue=256, batch_wait_ms=25, max_tokens_limit=max(64, args.max_tokens))
    app = make_app(model, tok, served, cfg)
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        asyncio.run(sequential_phase(url, 2, 2))  # warm-up
        b0 = app.state.engine.batches_run
        conc = asyncio.run(concurrent_phase(url, args.clients, args.per_client, args.max_tokens))
        conc["batches_run"] = app.state.engine.batches_run - b0
        print("concurrent", conc, flush=True)
        seq = asyncio.run(sequential_phase(url, args.sequential, args.max_tokens))
        print("sequential", seq, flush=True)
    finally:
        server.should_exit = True
        th.join(timeout=10)
        app.state.engine.close()
    res = {"command": run_command(), "loadavg_at_end": os.getloadavg(), "model": args.model, "max_tokens": args.max_tokens, "threads": args.threads,
           "host": "127.0.0.1 (loopback only)", "concurrent": conc, "sequential": seq,
           "throughput_ratio_concurrent_over_sequential": round(conc["throughput_req_s"] / seq["throughput_req_s"], 2)}
    print(json.dumps(res, indent=1))
    atomic_write_json(args.out, res)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
