"""Top-k SAE training speed and quality: saesteer vs sparsify vs SAELens on the same cached activations.

Same training rows (every shard of the cache but the last), same held-out rows (the last shard, capped), same number of
latents, k, batch size, number of steps, learning rate and warm-up, same batch order. saesteer is timed end to end
through ``saesteer.sae.trainer.train`` reading the cache from disk (initialisation, data loading and checkpoints included);
the peers are timed on the very same batches already in memory (their training loops only), which favours them.
saesteer runs with its default settings (``--mm-dtype auto``: top-k *selection* in bfloat16 on CPUs with AVX512-BF16 /
AMX, values and gradients float32); ``--extra-fp32`` adds a float32-selection row. Goal (issue 17): the default >= 1.5x
the faster peer with held-out FVU no worse.

* sparsify (EleutherAI, Python API; its CLI hard-codes CUDA): ``SparseCoder`` + the step of its ``Trainer``
  (b_dec = batch mean on step 0, fvu + auxk_alpha·AuxK, parallel-gradient removal, Adam, unit-norm decoder, dead
  counters).
* SAELens: ``TopKTrainingSAE`` driven by ``SAETrainer.fit`` on an iterator of the cached tensors (input normalisation
  ``expected_average_only_in``, folded back at the end).

Optionally (``--e2e-tokens N``) raw text → trained SAE: ``saesteer collect`` + ``saesteer train`` against SAELens's
``LanguageModelSAETrainingRunner`` on the same number of tokens of the same corpus.

Run (heavy: wrap it):
    flock /tmp/saesteer-cpu.lock env SAESTEER_THREADS=2 .venv/bin/python benchmarks/train_sae.py \
        --acts runs/acts-qwen-l12 --steps 40 --extra-fp32
Writes benchmarks/results/train_sae.json and prints a table.
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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from saesteer.activations import ActivationCache  # noqa: E402
from saesteer.core import atomic_write_json, set_threads  # noqa: E402
from saesteer.models import DEFAULT_MODEL
from saesteer.sae import (  # noqa: E402
    BatchReader,
    TrainConfig,
    epoch_order,
    lr_for,  # noqa: E402
    open_cache,
    train,
)


def split_cache(src: Path, tmp: Path, heldout: int) -> tuple[Path, torch.Tensor]:
    """A training cache of every shard but the last (symlinks, no copy) and the held-out rows of the last."""
    c = ActivationCache(src)
    assert c.n_shards >= 2, "the benchmark needs a cache with at least 2 shards"
    meta = dict(c.meta)
    shards = meta["shards"][:-1]
    dst = tmp / "train_cache"
    dst.mkdir(parents=True)
    for s in shards:
        os.symlink((src / s["file"]).resolve(), dst / s["file"])
    meta.update(shards=shards, n_tokens=sum(s["n_tokens"] for s in shards))
    (dst / "meta.json").write_text(json.dumps(meta))
    held = c.shard(c.n_shards - 1)[:heldout].to(torch.float32, copy=True)
    return dst, held


def fvu(x: torch.Tensor, recon: torch.Tensor) -> float:
    return float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def same_batches(cfg: TrainConfig, steps: int) -> list[torch.Tensor]:
    """The batches saesteer trains on, in its order (materialised for the peers)."""
    cache = open_cache(cfg.acts)
    reader = BatchReader(cache, cfg.chunk_rows, 2 * cfg.buffer_chunks)
    out, epoch = [], 0
    while len(out) < steps:
        order = epoch_order(cache.lens, cfg.chunk_rows, cfg.buffer_chunks, cfg.seed, epoch)
        for b in range(len(order) // cfg.batch_size):
            out.append(reader.rows(order[b * cfg.batch_size:(b + 1) * cfg.batch_size]))
            if len(out) == steps:
                break
        epoch += 1
    return out


def gemm_bound(batch: int, d: int, n_lat: int, ours_tok_s: float) -> dict:
    """The dense encoder matmul [batch, d] x [d, n_lat] every Top-k trainer must do (fp32, best of 5): its time per
    step, the tokens/s a trainer doing nothing else would reach, and the share of our step it takes."""
    x, w = torch.randn(batch, d), torch.randn(n_lat, d)
    out = torch.empty(batch, n_lat)
    ts = []
    for _ in range(6):
        t0 = time.perf_counter()
        torch.mm(x, w.t(), out=out)
        ts.append(time.perf_counter() - t0)
    t = min(ts[1:])
    return {"encoder_gemm_s": t, "gemm_gflop_s": 2 * batch * d * n_lat / t / 1e9,
            "tokens_per_s_if_only_the_encoder_gemm": batch / t,
            "gemm_share_of_our_step": t / (batch / ours_tok_s)}


def run_saesteer(cfg: TrainConfig, held: torch.Tensor) -> dict:
    t0 = time.perf_counter()
    sae = train(cfg)
    dt = time.perf_counter() - t0
    with torch.no_grad():
        dev = next(sae.parameters()).device
        f = fvu(held, sae(held.to(dev)).cpu())
    return {"seconds": dt, "tokens_per_s": cfg.steps * cfg.batch_size / dt, "heldout_fvu": f}


def run_sparsify(batches: list[torch.Tensor], held: torch.Tensor, n_lat: int, k: int, lr: float, warmup: int,
                 auxk_alpha: float, dead_window: int) -> dict:
    from sparsify import SaeConfig, SparseCoder

    d = held.shape[1]
    torch.manual_seed(0)
    sae = SparseCoder(d, SaeConfig(num_latents=n_lat, k=k))
    opt = torch.optim.Adam(sae.parameters(), lr=lr, eps=6.25e-10)  # sparsify's Trainer uses the same eps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    since = torch.zeros(n_lat, dtype=torch.long)
    t0 = time.perf_counter()
    for step, x in enumerate(batches):
        if step == 0:
            sae.b_dec.data = x.mean(0)
            sae.set_decoder_norm_to_unit_norm()
        out = sae(x, dead_mask=since > dead_window)
        (out.fvu + auxk_alpha * out.auxk_loss).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sched.step()
        sae.set_decoder_norm_to_unit_norm()
        fired = torch.zeros(n_lat, dtype=torch.bool)
        fired[out.latent_indices.flatten()] = True
        since += x.shape[0]
        since[fired] = 0
    dt = time.perf_counter() - t0
    with torch.no_grad():
        f = fvu(held, sae(held).sae_out)
    return {"seconds": dt, "tokens_per_s": sum(len(b) for b in batches) / dt, "heldout_fvu": f}


def run_saelens(batches: list[torch.Tensor], held: torch.Tensor, n_lat: int, k: int, lr: float, warmup: int) -> dict:
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    d = held.shape[1]
    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=n_lat, k=k,
                                                normalize_activations="expected_average_only_in"))
    bs = len(batches[0])
    norm_batches = batches[:5]
    cfg = SAETrainerConfig(total_training_samples=bs * len(batches), train_batch_size_samples=bs, lr=lr, lr_end=lr,
                           lr_warm_up_steps=warmup, device="cpu", n_batches_for_norm_estimate=len(norm_batches))
    provider = iter([*norm_batches, *batches])
    t0 = time.perf_counter()
    trainer = SAETrainer(cfg, sae, provider)
    trained = trainer.fit()
    dt = time.perf_counter() - t0
    with torch.no_grad():
        f = fvu(held, trained.decode(trained.encode(held)))
    return {"seconds": dt, "tokens_per_s": bs * len(batches) / dt, "heldout_fvu": f}


def run_e2e(model: str, layer: int, data: str, tokens: int, n_lat: int, k: int, batch: int, tmp: Path) -> dict:
    """Raw text → trained SAE, same tokens, one epoch each."""
    from saesteer.activations import CollectConfig, collect

    res = {}
    t0 = time.perf_counter()
    collect(CollectConfig(model=model, layer=layer, data=data, tokens=tokens, out=str(tmp / "e2e_acts"),
                          progress=False))
    t1 = time.perf_counter()
    n = ActivationCache(tmp / "e2e_acts").n_tokens
    steps = n // batch
    train(TrainConfig(acts=str(tmp / "e2e_acts"), out=str(tmp / "e2e_sae"), k=k, num_latents=n_lat, batch_size=batch,
                      steps=steps, warmup_steps=max(1, steps // 10), progress=False, init_sample=min(n, 32768)))
    t2 = time.perf_counter()
    res["saesteer"] = {"tokens": steps * batch, "collected": n, "collect_s": t1 - t0, "train_s": t2 - t1,
                       "tokens_per_s": steps * batch / (t2 - t0)}
    # SAELens: the same corpus as text, same model (HF folder of the converted built-in model)
    from datasets import Dataset
    from sae_lens import (
        LanguageModelSAERunnerConfig,
        LanguageModelSAETrainingRunner,
        LoggingConfig,
        TopKTrainingSAEConfig,
    )

    from saesteer.data import load_texts
    from saesteer.models import converted_dir, ensure_converted

    model_dir = Path(model) if Path(model).is_dir() else (ensure_converted(model) and converted_dir(model))
    texts = load_texts(data if not data.startswith("chat-mix") else "wikitext2", limit=2000)
    ds = Dataset.from_dict({"text": texts})
    d = ActivationCache(tmp / "e2e_acts").d_model
    cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=d, d_sae=n_lat, k=k), model_name=str(model_dir),
        model_class_name="AutoModelForCausalLM", hook_name=f"model.layers.{layer}", is_dataset_tokenized=False,
        streaming=False, context_size=128, store_batch_size_prompts=8,
        n_batches_in_buffer=max(4, -(-2 * batch // 127)),  # its buffer is n_batches × context and must hold a batch
        seqpos_slice=(1, None), exclude_special_tokens=True, training_tokens=steps * batch,
        train_batch_size_tokens=batch, lr=lr_for(n_lat), device="cpu", n_eval_batches=1, eval_batch_size_prompts=2,
        logger=LoggingConfig(log_to_wandb=False), output_path=str(tmp / "saelens_out"))
    t0 = time.perf_counter()
    LanguageModelSAETrainingRunner(cfg, override_dataset=ds).run()
    dt = time.perf_counter() - t0
    res["saelens_runner"] = {"tokens": steps * batch, "seconds": dt, "tokens_per_s": steps * batch / dt}
    res["speedup"] = res["saesteer"]["tokens_per_s"] / res["saelens_runner"]["tokens_per_s"]
    res["note"] = ("saesteer: collect (forward stopped at the layer) + train; SAELens runner: its own LM forward + "
                   "training on wikitext2 text (it cannot read our chat-mix); same token budget")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--acts", required=True)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--heldout", type=int, default=16384)
    ap.add_argument("--mm-dtype", default="auto", help="saesteer's top-k selection matmul precision (main row; auto = "
                                                       "the trainer's default: bfloat16 on CPUs with AVX512-BF16)")
    ap.add_argument("--extra-fp32", action="store_true", help="also time saesteer with float32 selection (extra row)")
    ap.add_argument("--skip", default="", help="comma list of peers to skip: sparsify,saelens,e2e")
    ap.add_argument("--e2e-tokens", type=int, default=0, help="raw text → SAE comparison budget (0: skip)")
    ap.add_argument("--e2e-model", default=DEFAULT_MODEL)
    ap.add_argument("--e2e-layer", type=int, default=12)
    ap.add_argument("--e2e-data", default="wikitext2")
    ap.add_argument("--device", default="cpu", help="saesteer's device (cpu, cuda); the peers run on the CPU: skip "
                                                   "them on a GPU run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_sae.json"))
    args = ap.parse_args()
    threads = set_threads(None)
    skip = set(filter(None, args.skip.split(",")))
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_sae_"))
    try:
        train_cache, held = split_cache(Path(args.acts), tmp, args.heldout)
        d = held.shape[1]
        n_lat = args.expansion * d
        lr, warmup = lr_for(n_lat), max(1, args.steps // 10)
        cfg = TrainConfig(acts=str(train_cache), out=str(tmp / "ours"), k=args.k, num_latents=n_lat,
                          batch_size=args.batch_size, steps=args.steps, lr=lr, warmup_steps=warmup, decay_frac=0.0,
                          checkpoint_every=10**9, mm_dtype=args.mm_dtype, progress=False, device=args.device)
        results: dict = {"config": {**vars(args), "d_model": d, "num_latents": n_lat, "lr": lr, "warmup": warmup,
                                    "threads": threads, "train_tokens_in_cache": open_cache(train_cache).n_tokens,
                                    "heldout_tokens": len(held)},
                         "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                                     "load_avg_start": os.getloadavg()},
                         "command": "python " + " ".join(sys.argv)}
        from dataclasses import replace

        train(replace(cfg, steps=2, out=str(tmp / "warmup")))  # one-time imports (torch.optim pulls in dynamo)
        results["saesteer"] = run_saesteer(cfg, held)
        print("saesteer", results["saesteer"], flush=True)
        atomic_write_json(args.out, results)  # partial results survive a later failure
        from saesteer.sae.trainer import selection_dtype

        results["config"]["selection_dtype"] = selection_dtype(args.mm_dtype, args.device)
        if args.extra_fp32 and results["config"]["selection_dtype"] != "float32":
            results["saesteer_fp32"] = run_saesteer(replace(cfg, mm_dtype="float32", out=str(tmp / "ours32")), held)
            print("saesteer fp32", results["saesteer_fp32"], flush=True)
        results["bound"] = gemm_bound(args.batch_size, d, n_lat, results["saesteer"]["tokens_per_s"])
        print("bound", results["bound"], flush=True)
        batches = same_batches(cfg, args.steps)
        if "sparsify" not in skip:
            results["sparsify"] = run_sparsify(batches, held, n_lat, args.k, lr, warmup, cfg.auxk_alpha,
                                               cfg.dead_window)
            print("sparsify", results["sparsify"], flush=True)
        if "saelens" not in skip:
            results["saelens"] = run_saelens(batches, held, n_lat, args.k, lr, warmup)
            print("saelens", results["saelens"], flush=True)
        del batches
        atomic_write_json(args.out, results)
        peers = [results[p]["tokens_per_s"] for p in ("sparsify", "saelens") if p in results]
        if peers:
            best = max(peers)
            results["speedup_vs_faster_peer"] = results["saesteer"]["tokens_per_s"] / best
            peer_fvu = min(results[p]["heldout_fvu"] for p in ("sparsify", "saelens") if p in results)
            results["fvu_no_worse"] = results["saesteer"]["heldout_fvu"] <= peer_fvu + 1e-3
            if "saesteer_fp32" in results:
                results["speedup_fp32_vs_faster_peer"] = results["saesteer_fp32"]["tokens_per_s"] / best
            results["goal"] = "saesteer (default settings) >= 1.5x the faster peer with held-out FVU no worse"
            results["goal_met"] = results["speedup_vs_faster_peer"] >= 1.5 and results["fvu_no_worse"]
            results["bound"]["max_speedup_vs_faster_peer_if_only_the_gemm"] = (
                results["bound"]["tokens_per_s_if_only_the_encoder_gemm"] / best)
        if args.e2e_tokens and "e2e" not in skip:
            atomic_write_json(args.out, results)
            try:
                results["end_to_end"] = run_e2e(args.e2e_model, args.e2e_layer, args.e2e_data, args.e2e_tokens,
                                                n_lat, args.k, min(args.batch_size, 1024), tmp)
            except Exception as e:  # noqa: BLE001 - keep the trainer comparison even if the e2e part fails
                results["end_to_end"] = {"error": f"{type(e).__name__}: {e}"}
            print("end_to_end", results["end_to_end"], flush=True)
        results["machine"]["load_avg_end"] = os.getloadavg()
        atomic_write_json(args.out, results)
        print(json.dumps({k: v for k, v in results.items() if k not in ("config", "machine")}, indent=1))
        print(f"wrote {args.out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
