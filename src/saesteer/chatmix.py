"""The SAE training corpus: plain text + chat conversations + prompts answered by the model itself.

O'Brien et al. found that SAEs trained on pretraining text alone had no refusal features; the corpus therefore mixes
  * ``text``: Wikipedia articles (plain text, tokenized with the tokenizer's usual special tokens),
  * ``chat``: HH-RLHF helpful conversations with the model's chat template applied,
  * ``harmful`` / ``harmless``: single-turn requests (half Arditi harmful train, half AdvBench train = even rows;
    Arditi harmless train) answered BY THE MODEL ITSELF (greedy, ``answer_tokens`` new tokens), so the refusals
    ("I'm sorry, but I can't ...") and compliances in the corpus are the model's own. These are repeated
    ``repeat_answered`` times to give them weight.

With the defaults (600 / 800 / 200 / 200, 24 answer tokens, repeated 2×) and ``context_len`` 256 on
Qwen2.5-Coder-0.5B the token shares are roughly 45 % text, 40 % chat, 15 % answered prompts. Everything is seeded
and deterministic (greedy answers; seeded samples and order).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .data import load_prompts
from .models import format_chat
from .utils import ensure


@dataclass
class MixDoc:
    """One document of the training mix."""

    text: str
    """The full text as the model sees it (chat template already applied for conversations)."""
    kind: str
    """``text``, ``chat``, ``harmful`` or ``harmless``."""
    id: str
    """``<source>/<id>`` of the item it came from."""
    templated: bool
    """True when ``text`` already holds the chat template's special tokens (tokenize without adding more)."""


@torch.inference_mode()
def greedy_answers(model: Any, tok: Any, prompts: Sequence[Any], max_new_tokens: int, batch_size: int = 16,
                   progress: bool = True) -> list[str]:
    """Greedy answers; uses :func:`saesteer.generation.generate` when it exists, else a small KV-cache loop."""
    try:
        from .generation import GenerationConfig, generate
    except ImportError:
        generate = None
    if generate is not None:
        return generate(model, tok, list(prompts), GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size))
    from rich.progress import Progress

    dev = next(model.parameters()).device
    eos = {t for t in [tok.eos_token_id, getattr(model.generation_config, "eos_token_id", None)] if t is not None}
    eos_ids = torch.tensor(sorted({e for x in eos for e in (x if isinstance(x, list) else [x])}), device=dev)
    out: list[str] = []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("answering prompts", total=len(prompts))
        for i in range(0, len(prompts), batch_size):
            texts = [format_chat(tok, p) for p in prompts[i : i + batch_size]]
            enc = tok(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
            ids, mask = enc.input_ids.to(dev), enc.attention_mask.to(dev)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            o = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
            nxt = o.logits[:, -1].argmax(-1)
            gen, done = [nxt], torch.isin(nxt, eos_ids)
            for _ in range(max_new_tokens - 1):
                if bool(done.all()):
                    break
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
                pos = pos[:, -1:] + 1
                o = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                          past_key_values=o.past_key_values, use_cache=True)
                nxt = torch.where(done, gen[-1], o.logits[:, -1].argmax(-1))
                gen.append(nxt)
                done |= torch.isin(nxt, eos_ids)
            seqs = torch.stack(gen, 1).tolist()
            for row in seqs:
                cut = next((j for j, t in enumerate(row) if t in set(eos_ids.tolist())), len(row))
                out.append(tok.decode(row[:cut], skip_special_tokens=True))
            bar.advance(task, len(texts))
    return out


def chat_mix(
    tok: Any,
    model: Any = None,
    n_text: int = 600,
    n_chat: int = 800,
    n_harmful: int = 200,
    n_harmless: int = 200,
    answer_tokens: int = 24,
    repeat_answered: int = 2,
    seed: int = 0,
    batch_size: int = 16,
    answers: dict[str, str] | None = None,
    progress: bool = True,
) -> list[MixDoc]:
    """Build the SAE training documents (see the module docstring). ``answers`` (prompt → answer) skips generation
    for prompts already answered and is filled in place with the new ones (collection caches it next to the
    activations so that a resume does not answer again)."""
    for n, what in ((n_text, "n_text"), (n_chat, "n_chat"), (n_harmful, "n_harmful"), (n_harmless, "n_harmless")):
        ensure(n >= 0, f"{what} must be >= 0")
    docs: list[MixDoc] = []
    for it in load_prompts("wikipedia", limit=n_text, seed=seed):
        docs.append(MixDoc(it.prompt or "", "text", f"wikipedia/{it.id}", False))
    for it in load_prompts("hh-helpful", limit=n_chat, seed=seed):
        docs.append(MixDoc(format_chat(tok, it.messages, add_generation_prompt=False), "chat", f"hh-helpful/{it.id}", True))
    half = n_harmful // 2
    harmful = load_prompts("arditi-harmful:train", limit=n_harmful - half, seed=seed) + load_prompts(
        "advbench:train", limit=half, seed=seed)
    harmless = load_prompts("arditi-harmless:train", limit=n_harmless, seed=seed)
    asked = [(it, "harmful") for it in harmful] + [(it, "harmless") for it in harmless]
    answers = {} if answers is None else answers
    todo = [it.prompt for it, _ in asked if it.prompt not in answers]
    if todo:
        ensure(model is not None, "chat_mix needs the model to answer the harmful/harmless prompts")
        for p, a in zip(todo, greedy_answers(model, tok, todo, answer_tokens, batch_size, progress)):
            answers[p] = a
    for it, kind in asked:
        conv = [{"role": "user", "content": it.prompt}, {"role": "assistant", "content": answers[it.prompt]}]
        text = format_chat(tok, conv, add_generation_prompt=False)
        docs.extend(MixDoc(text, kind, f"{it.source}/{it.id}", True) for _ in range(max(1, repeat_answered)))
    random.Random(seed).shuffle(docs)
    return docs
