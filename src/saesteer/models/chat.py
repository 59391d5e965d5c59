"""The chat format: messages, the tokenizer's chat template, special tokens."""

from __future__ import annotations

from typing import Any, Sequence

Message = dict[str, str]


def to_messages(prompt: str | Sequence[Message], system: str | None = None) -> list[Message]:
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if system is not None and (not msgs or msgs[0]["role"] != "system"):
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


def format_chat(
    tok: Any, prompt: str | Sequence[Message], add_generation_prompt: bool = True, system: str | None = None
) -> str:
    """Chat-format a prompt or conversation with the tokenizer's own template (plain fallback when it has none)."""
    msgs = to_messages(prompt, system)
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in msgs)
    return text + ("Assistant:" if add_generation_prompt else "")


def special_token_ids(tok: Any) -> set[int]:
    """Ids of all special / added control tokens (BOS, EOS, PAD, <|im_start|>, …): excluded from SAE data."""
    ids = set(getattr(tok, "all_special_ids", []) or [])
    for tid, added in (getattr(tok, "added_tokens_decoder", {}) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(tid))
    return {i for i in ids if i is not None}
