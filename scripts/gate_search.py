"""Which probe gate keeps the harmful fire rate while sparing benign look-alikes? A search chosen on validation only.

Reads the gate model's residuals (post-instruction tokens) once for the policies' train / validation / held-out
prompt slices (cached as safetensors under ``--cache``), then for every variant

- ``layers``: one layer or several concatenated (a probe on ``[h_16, h_20]`` is a learned ensemble of the layers),
- ``C``: inverse L2 strength of the logistic regression,
- ``hard``: weight of the hard benign training prompts (XSTest-safe, JBB-benign) relative to the rest,
- ``cap``: the FPR cap pooled over all benign validation prompts (``pooled``), or on each benign validation set
  separately (``per-set``: the threshold is the largest of the per-set thresholds),

fits the probe on the train slices, sets its threshold on the validation slices, and reports validation TPR / FPR per
set and the fire rate on each held-out set. Variants are ranked by validation numbers only (held-out rates are
printed for the record, never used to choose).

    .venv/bin/python scripts/gate_search.py --model qwen2.5-coder-1.5b-instruct --layers 12,16,20 \\
        --out docs/results/gate_search_1.5b.json

Analysis script for issue 6 (library code: ``saesteer.gating.gates``); writes JSON atomically.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

from gate_layers import TEST, TRAIN, VAL, residuals  # noqa: E402

from saesteer import models
from saesteer.core import atomic_write_json, rate_summary, set_threads  # noqa: E402
from saesteer.gating import (  # noqa: E402  # noqa: E402
    ProbeGate,
    choose_threshold,
    choose_threshold_per_set,
    gate_inputs_file,
    gate_inputs_key,
    load_slice,
    post_instruction_positions,
    text_key,
)
from saesteer.gating.fit import labelled_prompts

HARD = ("xstest", "jbb-benign")  # train sets whose benign prompts look harmful


def _groups(limit: int, tests: str) -> tuple[dict[str, list], dict[str, str]]:
    """Prompt lists per (split, set, label); and each group's role."""
    groups: dict[str, list] = {}
    role: dict[str, str] = {}
    seen: set[str] = set()
    for split, specs in (("train", TRAIN), ("val", VAL)):
        for spec in specs.split(","):
            h, s, used = labelled_prompts([spec], limit, 0, split)
            seen |= set(used[0]["keys"])
            for lab, items in (("harmful", h), ("harmless", s)):
                if items:
                    name = f"{split}:{spec.split('#')[0]}[{lab}]"
                    groups[name], role[name] = items, split
    for spec in tests.split(","):
        for it in load_slice(spec, limit=limit):
            if text_key(it.messages or it.prompt) in seen:
                continue
            name = f"test:{spec.split('#')[0]}[{it.label}]"
            groups.setdefault(name, []).append(it.messages or it.prompt)
            role[name] = "test"
    return groups, role


def _write_policy_cache(args: argparse.Namespace, layers: list[int], flat: list, res: dict[int, torch.Tensor]) -> None:
    """The train / val inputs in `saesteer policy fit --cache` form (same keys): its fits skip the forwards."""
    from safetensors.torch import save
    from transformers import AutoTokenizer

    from saesteer.core import atomic_write_bytes

    path, kw = models.resolve_model_path(args.model)
    tok = models.prepare_tokenizer(AutoTokenizer.from_pretrained(path, **kw))
    P = post_instruction_positions(tok)
    sids = [int(i) for i in tok(args.suffix, add_special_tokens=False)["input_ids"]] if args.suffix else None
    if sids:  # the library appends ids; this script tokenised text: only equal tokenisations may be cached
        P = min(P, len(sids))
        for p in flat:
            a = tok(models.format_chat(tok, p) + args.suffix, add_special_tokens=False)["input_ids"]
            b = tok(models.format_chat(tok, p), add_special_tokens=False)["input_ids"] + sids
            if a != b:
                print("suffix tokenises differently after some prompt: policy cache not written")
                return
    where = {}
    for i, p in enumerate(flat):
        where.setdefault(json.dumps(p, sort_keys=True), i)
    n = 0
    for specs in (TRAIN, VAL):
        h, s, _ = labelled_prompts(specs.split(","), args.limit, 0, "x")
        for L in layers:
            for prompts in (h, s):
                rows = torch.tensor([where[json.dumps(p, sort_keys=True)] for p in prompts])
                atomic_write_bytes(gate_inputs_file(args.policy_cache, gate_inputs_key(args.model, L, P, prompts, sids)),
                                   save({"h": res[L][rows].contiguous()}))
                n += 1
    print(f"wrote {n} policy-fit cache files to {args.policy_cache}")


def _threshold(scores: dict[str, torch.Tensor], fpr: float, cap: str) -> float:
    benign = [v for k, v in scores.items() if k.startswith("val:") and k.endswith("[harmless]")]
    return choose_threshold(torch.cat(benign), fpr) if cap == "pooled" else choose_threshold_per_set(benign, fpr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--layers", default="12,16,20", help="layers read; variants use each alone and the concatenations")
    ap.add_argument("--fpr", type=float, default=0.02)
    ap.add_argument("--C", default="0.03,0.1,0.3")
    ap.add_argument("--hard", default="1,4", help="weights of the hard benign training prompts")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=str(ROOT / "runs" / "gate-search"))
    ap.add_argument("--policy-cache", default=None, help="also write the train/val inputs where `saesteer policy fit "
                    "--cache` finds them")
    ap.add_argument("--suffix", default="", help="text appended after the chat template's assistant header (the gate "
                    "reads its last tokens): a prompted probe")
    ap.add_argument("--tests", default=TEST, help="held-out slices whose fire rates are reported")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "gate_search_1.5b.json"))
    args = ap.parse_args()
    set_threads(args.threads)
    layers = [int(x) for x in args.layers.split(",")]
    groups, role = _groups(args.limit, args.tests)
    key = hashlib.sha1(json.dumps([args.model, layers, groups] + ([args.suffix] if args.suffix else []),
                                  sort_keys=True).encode()).hexdigest()[:16]
    f = Path(args.cache) / f"residuals_{key}.safetensors"
    from safetensors.torch import load_file, save_file

    flat = [p for g in groups.values() for p in g]
    if f.exists():
        res = {int(k): v for k, v in load_file(str(f)).items()}
    else:
        model, tok = models.load_model(args.model)
        keep = max(layers) + 2
        if keep < len(models.get_layers(model)):
            del models.get_layers(model)[keep:]
            model.config.num_hidden_layers = keep
        P = post_instruction_positions(tok)
        uniq = list({json.dumps(p, sort_keys=True): p for p in flat}.values())
        uniq.sort(key=lambda p: len(tok(models.format_chat(tok, p), add_special_tokens=False)["input_ids"]))
        print(f"{len(uniq)} distinct prompts, layers {layers}, {P} positions", flush=True)
        if args.suffix:  # read the gate model after a fixed assistant prefix that asks for a verdict
            texts = [models.format_chat(tok, p) + args.suffix for p in uniq]
            P = min(P, len(tok(args.suffix, add_special_tokens=False)["input_ids"]))
            got = residuals(model, tok, texts, layers, P, formatted=True)
        else:
            got = residuals(model, tok, uniq, layers, P)  # sorted by length: little padding
        where = {json.dumps(p, sort_keys=True): i for i, p in enumerate(uniq)}
        idx = torch.tensor([where[json.dumps(p, sort_keys=True)] for p in flat])
        res = {L: got[L][idx] for L in layers}
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_suffix(".tmp")
        save_file({str(k): v.contiguous() for k, v in res.items()}, str(tmp))
        tmp.rename(f)
    if args.policy_cache:
        _write_policy_cache(args, layers, flat, res)
    parts: dict[str, dict[int, torch.Tensor]] = {}
    cut = 0
    for name, g in groups.items():
        parts[name] = {L: res[L][cut:cut + len(g)] for L in layers}
        cut += len(g)

    layer_sets = [(L,) for L in layers] + [c for r in range(2, len(layers) + 1) for c in itertools.combinations(layers, r)]
    rows = []
    for ls, C, hard in itertools.product(layer_sets, [float(c) for c in args.C.split(",")],
                                          [float(h) for h in args.hard.split(",")]):
        feats = {n: torch.cat([parts[n][L].mean(1) for L in ls], 1) for n in groups}
        tr = [n for n in groups if role[n] == "train"]
        pos = [n for n in tr if n.endswith("[harmful]")]
        neg = [n for n in tr if n.endswith("[harmless]")]
        sw = torch.cat([torch.full((len(groups[n]),), hard if any(h in n for h in HARD) else 1.0) for n in neg])
        gate = ProbeGate(ls[0], 1, C=C)
        gate.fit(torch.cat([feats[n] for n in pos]).unsqueeze(1), torch.cat([feats[n] for n in neg]).unsqueeze(1),
                 harmless_weight=sw)
        scores = {n: gate.score(feats[n].unsqueeze(1)) for n in groups}
        for cap in ("pooled", "per-set"):
            t = _threshold(scores, args.fpr, cap)
            rate = {n: rate_summary(int((s > t).sum()), len(s)) for n, s in scores.items() if role[n] != "train"}
            vh = torch.cat([s for n, s in scores.items() if role[n] == "val" and n.endswith("[harmful]")])
            row = {"layers": list(ls), "C": C, "hard": hard, "cap": cap, "threshold": t,
                   "val_tpr": float((vh > t).float().mean()), "rates": {n: r["rate"] for n, r in rate.items()},
                   "n": {n: r["n"] for n, r in rate.items()}}
            rows.append(row)
    for cap in ("pooled", "per-set"):
        print(f"\n== threshold cap {cap} (FPR {args.fpr}); sorted by val TPR; test columns never used to choose ==")
        sub = sorted((r for r in rows if r["cap"] == cap), key=lambda r: -r["val_tpr"])
        cols = [n for n in groups if role[n] != "train"]
        short = [n.replace("[harmful]", "+").replace("[harmless]", "-").replace("arditi-", "a-") for n in cols]
        print("layers     C     hard  valTPR | " + " ".join(f"{s[:16]:>16}" for s in short))
        for r in sub[:12]:
            print(f"{','.join(map(str, r['layers'])):10} {r['C']:<5} {r['hard']:<5} {r['val_tpr']:.3f}  | " +
                  " ".join(f"{r['rates'][n]:16.2f}" for n in cols))
    atomic_write_json(args.out, {"command": " ".join(sys.argv), "model": args.model, "fpr": args.fpr,
                                 "suffix": args.suffix, "train": TRAIN, "val": VAL, "test": args.tests,
                                 "n": {k: len(v) for k, v in groups.items()}, "variants": rows})
    print("wrote", args.out)


if __name__ == "__main__":
    main()
