"""Which layer separates harmful from harmless prompts best? A probe gate per layer, same data as the policies.

For every layer in ``--layers`` a ``saesteer.gating.gates.ProbeGate`` (logistic regression on the mean residual over the
post-instruction tokens) is fitted on the policies' train sets, its threshold set on their validation sets for a
``--fpr`` cap on benign prompts, and its fire rate measured on the held-out slices the comparison draws from
(XSTest / JBB 60-100 %, Arditi test). One forward pass per prompt batch reads every layer at once.

    .venv/bin/python scripts/gate_layers.py --out docs/results/gate_layers.json

Prints a table and writes JSON (atomically). This is an analysis script for issue 6 (why the gates fall short),
not part of the library: a gate that reads a layer after the steering layer would need a second prefill pass.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from saesteer import models
from saesteer.core import atomic_write_json, rate_summary, set_threads  # noqa: E402
from saesteer.gating import ProbeGate, load_slice, post_instruction_positions, text_key  # noqa: E402  # noqa: E402
from saesteer.gating.fit import labelled_prompts

TRAIN = "arditi-harmful:train,arditi-harmless:train,xstest#0:0.4,jbb-harmful#0:0.4,jbb-benign#0:0.4"
VAL = "arditi-harmful:val,arditi-harmless:val,xstest#0.4:0.6,jbb-harmful#0.4:0.6,jbb-benign#0.4:0.6"
TEST = "xstest#0.6:1,jbb-harmful#0.6:1,jbb-benign#0.6:1,arditi-harmful:test,arditi-harmless:test"


@torch.inference_mode()
def residuals(model, tok, prompts, layers, P, batch_size=16, formatted=False) -> dict[int, torch.Tensor]:
    """``{layer: [n, P, d]}``: residual after each layer at the last P tokens of each chat-formatted prompt
    (``formatted``: the prompts are final texts already)."""
    from tqdm.auto import tqdm

    texts = list(prompts) if formatted else [models.format_chat(tok, p) for p in prompts]
    out: dict[int, list[torch.Tensor]] = {L: [] for L in layers}
    for i in tqdm(range(0, len(texts), batch_size), desc="residuals", unit="batch", leave=False):
        enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        hs = model(**enc, output_hidden_states=True).hidden_states  # hs[L + 1] = output of decoder layer L
        for L in layers:
            out[L].append(hs[L + 1][:, -P:].float())
    return {L: torch.cat(v) for L, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--layers", default="4,6,8,10,12,14,16,18,20")
    ap.add_argument("--fpr", type=float, default=0.02)
    ap.add_argument("--limit", type=int, default=200, help="seeded sample per prompt set (as the policy fits)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "gate_layers.json"))
    args = ap.parse_args()
    set_threads(args.threads)
    model, tok = models.load_model(args.model)
    n_layers = len(models.get_layers(model))
    layers = [int(x) for x in args.layers.split(",")]
    for L in layers:
        models.check_layer(model, L)
        if L >= n_layers - 1:
            raise SystemExit(f"layer {L}: the last layer's hidden state is after the final norm; pick < {n_layers - 1}")
    keep = max(layers) + 2  # layers past the deepest one read are never needed (the +1 keeps hs[L + 1] un-normed)
    if keep < n_layers:
        del models.get_layers(model)[keep:]
        model.config.num_hidden_layers = keep
    P = post_instruction_positions(tok)
    th, ts, used = labelled_prompts(TRAIN.split(","), args.limit, 0, "train")
    vh, vs, vused = labelled_prompts(VAL.split(","), args.limit, 0, "val")
    seen = {k for u in used + vused for k in u["keys"]}
    tests: dict[str, list] = {}
    for spec in TEST.split(","):
        items = [it for it in load_slice(spec, limit=args.limit) if text_key(it.messages or it.prompt) not in seen]
        for it in items:
            tests.setdefault(f"{spec.split('#')[0]}[{it.label}]", []).append(it.messages or it.prompt)
    groups = {"train_h": th, "train_s": ts, "val_h": vh, "val_s": vs, **tests}
    flat = [p for g in groups.values() for p in g]
    print(f"{len(flat)} prompts, layers {layers}, {P} post-instruction positions", flush=True)
    res = residuals(model, tok, flat, layers, P)
    rows = []
    for L in layers:
        cut, parts = 0, {}
        for name, g in groups.items():
            parts[name] = res[L][cut:cut + len(g)]
            cut += len(g)
        gate = ProbeGate(L, P).fit(parts["train_h"], parts["train_s"])
        stats = gate.calibrate(gate.score(parts["val_s"]), gate.score(parts["val_h"]), args.fpr)
        fire = {name: rate_summary(int(gate.decide(parts[name])[1].sum()), len(tests[name])) for name in tests}
        rows.append({"layer": L, "val": stats, "fire": fire})
        print(f"layer {L:2d}: val TPR {stats['val_tpr']:.2f} FPR {stats['val_fpr']:.3f} | " + " ".join(
            f"{k} {v['rate']:.2f}" for k, v in fire.items()), flush=True)
    atomic_write_json(args.out, {"command": " ".join(sys.argv), "model": args.model, "fpr": args.fpr,
                                 "positions": P, "train": TRAIN, "val": VAL, "test": TEST,
                                 "n": {k: len(v) for k, v in groups.items()}, "layers": rows})
    print("wrote", args.out)


if __name__ == "__main__":
    main()
