"""Collection forwards only what it stores: the batch that reaches the token budget is cut to the documents whose
rows are taken, and the stored rows still equal a plain unpadded forward of each document."""

from __future__ import annotations

import json

import torch

from saesteer import models
from saesteer.activations import ActivationCache, CollectConfig, collect

TEXTS = [f"document number {i} " + "with a few more words " * (1 + i % 4) for i in range(24)]


def test_last_batch_is_trimmed_and_rows_match_plain_forward(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    p = tmp_path / "docs.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    real = models.run_to_layer
    shapes: list[tuple[int, int]] = []

    def counting(m, ids, mask, layer):
        shapes.append(tuple(ids.shape))
        return real(m, ids, mask, layer)

    monkeypatch.setattr(models, "run_to_layer", counting)
    budget = 77
    out = collect(CollectConfig(model="tiny", layer=0, data=str(p), tokens=budget, out=str(tmp_path / "acts"),
                                batch_size=8, context_len=64, shard_tokens=1000, progress=False), model, tok)
    cache = ActivationCache(out)
    assert len(cache) == budget
    dids = cache.shard_tensor(0, "doc_ids")
    tids = cache.shard_tensor(0, "token_ids")
    acts = cache.shard(0).float()
    # every forwarded document contributes stored rows: nothing beyond the budget was forwarded
    assert sum(r for r, _ in shapes) == len(set(dids.tolist()))
    specials = models.special_token_ids(tok)
    for d in set(dids.tolist()):
        ids = tok(TEXTS[d], add_special_tokens=True)["input_ids"][:64]
        with torch.no_grad():
            hs = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[1][0]
        keep = [i for i in range(1, len(ids)) if ids[i] not in specials]
        sel = dids == d
        n = int(sel.sum())  # the last document may be cut short by the budget
        assert tids[sel].tolist() == [ids[i] for i in keep[:n]]
        torch.testing.assert_close(acts[sel], hs[keep[:n]], atol=1e-4, rtol=1e-4)
