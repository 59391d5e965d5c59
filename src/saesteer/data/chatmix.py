"""The SAE training corpus: plain text + chat conversations + prompts answered by the model itself.

O'Brien et al. found that SAEs trained on pretraining text alone had no refusal features; the corpus therefore mixes
  * ``text``: Wikipedia articles (plain text, tokenized with the tokenizer's usual special tokens),
  * ``chat``: HH-RLHF helpful conversations with the model's chat template applied,
  * ``harmful`` / ``harmless``: single-turn requests (half Arditi harmful train, half AdvBench train = even rows;
    Arditi harmless train) answered BY THE MODEL ITSELF (greedy, ``answer_tokens`` new tokens), so the refusals
    ("I'm sorry, but I can't ...") and compliances in the corpus are the model's own. These are repeated
    ``repeat_answered`` times to give them weight.

With the defaults (600 text / 700 chat / 160 harmful / 160 harmless, 24 answer tokens, answered prompts repeated
3×) and ``context_len`` 256 on Qwen2.5-Coder-0.5B (measured: ~204 tokens per text doc, ~206 per chat, ~65 per
answered prompt) the token shares are roughly 37 % text, 44 % chat, 19 % answered prompts (~330k tokens in all).
Everything is seeded and deterministic (greedy answers; seeded samples and order).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from saesteer.core import SaesteerError, ensure
from saesteer.generation import GenerationConfig, generate
from saesteer.models import format_chat

from .prompts import load_prompts


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


def _text_items(n_text: int, seed: int) -> tuple[str, list]:
    """The plain-text documents: the Wikipedia sample, or — where it is not available (it is the one named set that
    ``saesteer data fetch`` cannot rebuild yet) — WikiText-2 articles, with a warning; the doc ids name the source."""
    if n_text == 0:
        return "wikipedia", []
    try:
        return "wikipedia", load_prompts("wikipedia", limit=n_text, seed=seed)
    except SaesteerError as e:
        if "not found" not in str(e):
            raise
    import sys

    print("saesteer: warning: the wikipedia sample is not available here; the chat mix takes its plain-text documents "
          "from wikitext2 instead", file=sys.stderr)
    return "wikitext2", load_prompts("wikitext2", limit=n_text, seed=seed)


def chat_mix(
    tok: Any,
    model: Any = None,
    n_text: int = 600,
    n_chat: int = 700,
    n_harmful: int = 160,
    n_harmless: int = 160,
    answer_tokens: int = 24,
    repeat_answered: int = 3,
    seed: int = 0,
    batch_size: int = 32,
    answers: dict[str, str] | None = None,
    progress: bool = True,
) -> list[MixDoc]:
    """Build the SAE training documents (see the module docstring). ``answers`` (prompt → answer) skips generation
    for prompts already answered and is filled in place with the new ones (collection caches it next to the
    activations so that a resume does not answer again)."""
    for n, what in ((n_text, "n_text"), (n_chat, "n_chat"), (n_harmful, "n_harmful"), (n_harmless, "n_harmless")):
        ensure(n >= 0, f"{what} must be >= 0")
    docs: list[MixDoc] = []
    source, texts = _text_items(n_text, seed)
    for it in texts:
        docs.append(MixDoc(it.prompt or "", "text", f"{source}/{it.id}", False))
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
        gcfg = GenerationConfig(max_new_tokens=answer_tokens, batch_size=batch_size, progress=progress)
        for p, a in zip(todo, generate(model, tok, todo, gcfg)):
            answers[p] = a
    for it, kind in asked:
        conv = [{"role": "user", "content": it.prompt}, {"role": "assistant", "content": answers[it.prompt]}]
        text = format_chat(tok, conv, add_generation_prompt=False)
        docs.extend(MixDoc(text, kind, f"{it.source}/{it.id}", True) for _ in range(max(1, repeat_answered)))
    random.Random(seed).shuffle(docs)
    return docs
