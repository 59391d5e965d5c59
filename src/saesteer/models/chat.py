"""The chat format: messages, the tokenizer's chat template, special tokens."""

from __future__ import annotations

from typing import Any, Sequence

Message = dict[str, str]


def to_messages(prompt: str | Sequence[Message], system: str | None = None,
                system_prefix: str | None = None) -> list[Message]:
    """The prompt as messages. ``system``: a system message added when there is none. ``system_prefix`` (a policy's
    fixed system prompt, ``saesteer.gating.SAFETY_SYSTEM_PROMPT``): put before any system message (after ``system``
    was added), separated by a blank line, or inserted as the system message when there is none — so it replaces the
    template's default system prompt (Qwen's "You are Qwen, ...") and never drops the conversation's own."""
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if system is not None and (not msgs or msgs[0]["role"] != "system"):
        msgs.insert(0, {"role": "system", "content": system})
    if system_prefix:
        if msgs and msgs[0]["role"] == "system":
            msgs[0]["content"] = f"{system_prefix}\n\n{msgs[0]['content']}" if msgs[0]["content"] else system_prefix
        else:
            msgs.insert(0, {"role": "system", "content": system_prefix})
    return msgs


def format_chat(
    tok: Any, prompt: str | Sequence[Message], add_generation_prompt: bool = True, system: str | None = None,
    system_prefix: str | None = None,
) -> str:
    """Chat-format a prompt or conversation with the tokenizer's own template (plain fallback when it has none);
    ``system`` / ``system_prefix`` as in :func:`to_messages`."""
    msgs = to_messages(prompt, system, system_prefix)
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
