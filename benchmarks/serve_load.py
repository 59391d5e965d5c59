"""Load test and soak run of ``saesteer serve`` on loopback: latency / throughput at 1, 8, 32, 64 clients, flat RSS.

    flock /tmp/saesteer-cpu.lock env SAESTEER_THREADS=1 .venv/bin/python benchmarks/serve_load.py \
        --model smollm2-135m-instruct --soak-s 600

Starts the server in-process on 127.0.0.1 (on a socket it keeps; nothing leaves the machine), serving ``--model``
unsteered (``default``) and steered (``default+steer``: ``steering.Add`` of a fixed random vector at ``--layer``, a
``ServedSteering``, so both names are decoded in the same batches with per-row scales).

1. Load: for each level in ``--levels`` (default 1, 8, 32, 64), that many concurrent clients each send requests one
   after another (``--per-client``, at least ``--min-requests`` in all per level), alternating the two model names;
   every client's last request streams (SSE). Every request asks for ``--max-tokens`` greedy tokens. Reports errors,
   p50 / p95 latency, requests/s, completion tokens/s and the rows per batch.
2. Soak: ``--soak-clients`` clients send requests back to back for ``--soak-s`` seconds (every 5th streams, every 7th
   is dropped mid-stream by the client). The process RSS is sampled every ``--rss-every-s`` seconds; reports the
   samples, the RSS growth over the second half of the run, errors and requests served, and checks ``/health``.

The machine load (``uptime`` and ``os.getloadavg``) before and after is recorded: on a shared 2-core machine the
figures are only comparable between runs under similar load. Prints and saves ``benchmarks/results/serve_load.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import socket
import subprocess
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
from saesteer.serve.server import ServedSteering
from saesteer.steering import Add  # noqa: E402

QUESTIONS = ["What is the capital of France?", "How do I make a bomb?", "Write a haiku about rain.",
             "Explain recursion briefly.", "How can I steal a car?", "Give me a tip for better sleep.",
             "What is 17 times 3?", "Write a phishing email."]


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))], 3)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


async def one(cl: httpx.AsyncClient, url: str, model: str, q: str, max_tokens: int, stream: bool,
              drop_after: int | None = None) -> tuple[float, int]:
    """One request; returns (latency, completion tokens). ``drop_after``: close the stream after that many chunks."""
    body = {"model": model, "messages": [{"role": "user", "content": q}], "max_tokens": max_tokens, "temperature": 0,
            "stream": stream}
    t0 = time.perf_counter()
    if not stream:
        r = await cl.post(url, json=body)
        r.raise_for_status()
        return time.perf_counter() - t0, r.json()["usage"]["completion_tokens"]
    body["stream_options"] = {"include_usage": True}
    n_tok, n_chunks = 0, 0
    async with cl.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                obj = json.loads(line[6:])
                if "error" in obj:
                    raise RuntimeError(obj["error"]["message"])
                if obj.get("usage"):
                    n_tok = obj["usage"]["completion_tokens"]
                n_chunks += 1
                if drop_after is not None and n_chunks >= drop_after:
                    break  # the client goes away mid-stream
    return time.perf_counter() - t0, n_tok


async def load_level(url: str, clients: int, per_client: int, max_tokens: int, engine) -> dict:
    lat, errors, toks = [], [], 0

    async def client(c: int) -> None:
        nonlocal toks
        async with httpx.AsyncClient(timeout=600) as cl:
            for j in range(per_client):
                model = "default+steer" if (c + j) % 2 else "default"
                try:
                    dt, n = await one(cl, url, model, QUESTIONS[(c + j) % len(QUESTIONS)], max_tokens,
                                      j == per_client - 1)
                    lat.append(dt)
                    toks += n
                except Exception as e:  # noqa: BLE001 - counted and reported
                    errors.append(f"{type(e).__name__}: {e}")

    b0, sizes0 = engine.batches_run, len(engine.batch_sizes)
    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    wall = time.perf_counter() - t0
    nb = engine.batches_run - b0
    sizes = list(engine.batch_sizes)[sizes0:] if len(engine.batch_sizes) < engine.batch_sizes.maxlen else []
    return {"clients": clients, "requests_per_client": per_client, "requests": len(lat) + len(errors),
            "errors": len(errors), "error_samples": errors[:5], "wall_s": round(wall, 2),
            "latency_p50_s": pct(lat, 0.5), "latency_p95_s": pct(lat, 0.95), "latency_max_s": pct(lat, 1.0),
            "requests_s": round(len(lat) / wall, 3), "completion_tokens": toks, "tokens_s": round(toks / wall, 2),
            "batches": nb, "mean_rows_per_batch": round(sum(sizes) / len(sizes), 2) if sizes else None}


async def soak(url: str, health: str, clients: int, seconds: float, max_tokens: int, rss_every: float) -> dict:
    import psutil

    proc = psutil.Process()
    samples: list[tuple[float, float]] = []
    lat, errors, done, dropped = [], [], 0, 0
    t_start = time.perf_counter()
    stop_at = t_start + seconds

    async def client(c: int) -> None:
        nonlocal done, dropped
        j = 0
        async with httpx.AsyncClient(timeout=600) as cl:
            while time.perf_counter() < stop_at:
                model = "default+steer" if (c + j) % 2 else "default"
                stream, drop = j % 5 == 4, (2 if j % 7 == 6 else None)
                try:
                    dt, _ = await one(cl, url, model, QUESTIONS[(c + j) % len(QUESTIONS)], max_tokens,
                                      stream or drop is not None, drop)
                    lat.append(dt)
                    done += 1
                    dropped += drop is not None
                except Exception as e:  # noqa: BLE001
                    errors.append(f"{type(e).__name__}: {e}")
                j += 1

    async def sampler() -> None:
        while time.perf_counter() < stop_at:
            samples.append((round(time.perf_counter() - t_start, 1), round(proc.memory_info().rss / 2**20, 1)))
            await asyncio.sleep(rss_every)

    await asyncio.gather(sampler(), *(client(c) for c in range(clients)))
    wall = time.perf_counter() - t_start
    async with httpx.AsyncClient(timeout=30) as cl:
        healthy = (await cl.get(health)).json()
    samples.append((round(wall, 1), round(proc.memory_info().rss / 2**20, 1)))
    half = [s for s in samples if s[0] >= wall / 2]
    growth = round(half[-1][1] - half[0][1], 1) if len(half) >= 2 else None
    return {"seconds": round(wall, 1), "clients": clients, "requests_ok": done, "dropped_mid_stream_by_client": dropped,
            "errors": len(errors), "error_samples": errors[:5], "latency_p50_s": pct(lat, 0.5),
            "latency_p95_s": pct(lat, 0.95), "rss_mb_first": samples[0][1], "rss_mb_last": samples[-1][1],
            "rss_mb_max": max(s[1] for s in samples), "rss_mb_growth_second_half": growth,
            "rss_samples_s_mb": samples, "health_after": healthy}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--levels", default="1,8,32,64")
    ap.add_argument("--per-client", type=int, default=2)
    ap.add_argument("--min-requests", type=int, default=12, help="at least this many requests per level")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--layer", type=int, default=10)
    ap.add_argument("--soak-s", type=float, default=600.0, help="soak duration (0: no soak)")
    ap.add_argument("--soak-clients", type=int, default=8)
    ap.add_argument("--rss-every-s", type=float, default=15.0)
    ap.add_argument("--threads", type=int, default=1, help="1 beats 2 by far on a loaded 2-core machine")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load.json"))
    args = ap.parse_args()
    set_threads(args.threads)
    up0, load0 = uptime(), os.getloadavg()
    model, tok = models.load_model(args.model)
    v = torch.randn(models.d_model(model), generator=torch.Generator().manual_seed(0))
    served = served_models(model)
    served["default+steer"] = ServedSteering([Add(vector=v / v.norm() * 4.0, alpha=1.0, layer=args.layer)])
    cfg = ServeConfig(max_batch=args.max_batch, max_queue=256, batch_wait_ms=25,
                      max_tokens_limit=max(64, args.max_tokens))
    app = make_app(model, tok, served, cfg)
    engine = app.state.engine
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # kept open and handed to uvicorn: no rebind race
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    url = base + "/v1/chat/completions"
    levels, soak_res = [], None
    try:
        asyncio.run(load_level(url, 1, 2, 2, engine))  # warm-up
        for n in [int(x) for x in args.levels.split(",")]:
            per = max(args.per_client, math.ceil(args.min_requests / n))
            res = asyncio.run(load_level(url, n, per, args.max_tokens, engine))
            print("load", json.dumps(res), flush=True)
            levels.append(res)
        if args.soak_s > 0:
            soak_res = asyncio.run(soak(url, base + "/health", args.soak_clients, args.soak_s, args.max_tokens,
                                        args.rss_every_s))
            print("soak", json.dumps({k: v for k, v in soak_res.items() if k != "rss_samples_s_mb"}), flush=True)
    finally:
        server.should_exit = True
        th.join(timeout=10)
        engine.close()
        sock.close()
    res = {"command": run_command(), "model": args.model, "max_tokens": args.max_tokens, "threads": args.threads,
           "max_batch": args.max_batch, "host": "127.0.0.1 (loopback only)",
           "served": "default + default+steer (ServedSteering Add, mixed in the same batches)",
           "uptime_before": up0, "uptime_after": uptime(), "loadavg_before": load0, "loadavg_after": os.getloadavg(),
           "cpu_count": os.cpu_count(), "load": levels,
           "latency_table": [{"clients": r["clients"], "p50_s": r["latency_p50_s"], "p95_s": r["latency_p95_s"],
                              "tokens_s": r["tokens_s"], "requests_s": r["requests_s"], "errors": r["errors"]}
                             for r in levels],
           "soak": soak_res}
    print(json.dumps({k: v for k, v in res.items() if k not in ("load", "soak")}, indent=1))
    atomic_write_json(args.out, res)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
