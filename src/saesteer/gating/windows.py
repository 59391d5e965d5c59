"""WindowRead: what a gate reads of a long user message — overlapping windows of it, each posed as its own request.

A gate fitted on the template tokens after short requests reads the residual there; when the harmful request is a
sentence inside a 300-word article, the whole article is what that residual summarises, and the request's signal is
diluted (``scripts/spread_gates.sh``: a probe that fires on 42 % of plain harmful requests fires on 7 / 40 of the same
requests embedded in an article, or on every article alike). ``read="windows"`` (``gating.policy``) also scores
windows of every long user message: the message's tokens cut into windows of ``size`` tokens every ``stride`` tokens,
each wrapped as a single-turn chat prompt (``prefix_ids`` + window + ``close_ids``, the template's own tokens) and
read by the gate at its post-instruction tokens, as if a user had sent that passage alone. The policy keeps the
highest score over these windows and over every user turn (``read="turns"``). A request of up to
``size - stride + 1`` tokens lies whole inside at least one window.

With ``split="paragraphs"`` (``break_ids``: every token whose text holds a line break) a long message is first cut
after each such token, and each paragraph is posed as its own request (a paragraph longer than ``size`` is windowed as
above): a request written as its own paragraph of a document is then read alone, without the text around it.

Everything here works on token ids, so ``policy fit`` (which formats and tokenizes its prompts) and the policy's
prefill hook (which sees only the ids) cut the very same windows. A user message is found by the template's own
markers: the tokens that open a user turn (``open_ids``, the longest common suffix of what precedes the user's text
in a one-turn and in a two-turn conversation) and those that close it (``close_ids``, what follows the user's text
in a one-turn prompt: ``<|im_end|>\\n<|im_start|>assistant\\n`` for Qwen). Cost: one extra forward up to the gate
layer over about ``size / stride`` times each long message's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from saesteer.core import ensure

_PROBES = ("Alpha request about the weather 1", "Beta question on something else? 2")
SPLITS = ("fixed", "paragraphs")


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _common_suffix(a: Sequence[int], b: Sequence[int]) -> int:
    return _common_prefix(list(reversed(a)), list(reversed(b)))


def _find(ids: Sequence[int], pat: Sequence[int], start: int = 0) -> int:
    """First index >= ``start`` where ``pat`` occurs in ``ids`` (-1: none)."""
    n, m = len(ids), len(pat)
    first = pat[0]
    for i in range(start, n - m + 1):
        if ids[i] == first and list(ids[i:i + m]) == list(pat):
            return i
    return -1


@dataclass(frozen=True)
class WindowRead:
    """How a ``windows`` gate cuts long user messages into single-turn requests (see the module docstring)."""

    size: int
    """Window length in tokens."""
    stride: int
    """Tokens between window starts (<= size: windows overlap by size - stride)."""
    prefix_ids: tuple[int, ...]
    """A one-turn chat prompt's tokens before the user's text (system prompt and the user-turn opener)."""
    open_ids: tuple[int, ...]
    """The tokens that open every user turn (a suffix of ``prefix_ids``)."""
    close_ids: tuple[int, ...]
    """The tokens after the user's text in a one-turn prompt (end of turn + assistant opener)."""
    break_ids: tuple[int, ...] = ()
    """``split="paragraphs"``: token ids after which a paragraph ends (every token whose text holds a line break);
    empty: fixed windows only."""

    @property
    def split(self) -> str:
        return "paragraphs" if self.break_ids else "fixed"

    def __post_init__(self) -> None:
        ensure(isinstance(self.size, int) and self.size >= 1, f"window size must be a positive integer, got {self.size!r}")
        ensure(isinstance(self.stride, int) and 1 <= self.stride <= self.size,
               f"window stride must be an integer in [1, size = {self.size}], got {self.stride!r}")
        ensure(len(self.open_ids) > 0 and len(self.close_ids) > 0, "a window read needs the template's user-turn markers")
        ensure(tuple(self.prefix_ids[-len(self.open_ids):]) == tuple(self.open_ids),
               "the window prefix must end with the user-turn opener")

    @classmethod
    def from_tokenizer(cls, tok: Any, size: int = 96, stride: int = 48, system: str | None = None,
                       split: str = "fixed") -> "WindowRead":
        """Find the template's markers by formatting probe conversations (``system``: a policy's system prompt, put
        first in every view as generation under the policy does); ``split="paragraphs"``: also the line-break tokens
        of the vocabulary."""
        from saesteer.models import format_chat

        ensure(split in SPLITS, f"unknown window split {split!r} (choose from {', '.join(SPLITS)})")

        def ids(p: Any) -> list[int]:
            return [int(i) for i in tok(format_chat(tok, p, system_prefix=system), add_special_tokens=False)["input_ids"]]

        a, b = ids(_PROBES[0]), ids(_PROBES[1])
        pre, post = _common_prefix(a, b), _common_suffix(a, b)
        ensure(pre + post < min(len(a), len(b)), "cannot find the user's text in the chat template's output")
        two = [ids([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": p}]) for p in _PROBES]
        pre2 = _common_prefix(*two)
        n_open = _common_suffix(a[:pre], two[0][:pre2])
        ensure(n_open > 0 and post > 0, "the chat template marks no user turn in its tokens: no window read for it")
        breaks = line_break_ids(tok) if split == "paragraphs" else ()
        ensure(split == "fixed" or len(breaks) > 0, "the tokenizer has no line-break tokens to split paragraphs at")
        return cls(size=int(size), stride=int(stride), prefix_ids=tuple(a[:pre]), open_ids=tuple(a[pre - n_open:pre]),
                   close_ids=tuple(a[len(a) - post:]), break_ids=breaks)

    def spans(self, ids: Sequence[int]) -> list[tuple[int, int]]:
        """``[start, end)`` of every user message's text in a conversation's token ids."""
        ids = [int(i) for i in ids]
        out, i = [], 0
        while True:
            o = _find(ids, self.open_ids, i)
            if o < 0:
                return out
            s = o + len(self.open_ids)
            e = _find(ids, self.close_ids, s)
            nxt = _find(ids, self.open_ids, s)
            end = len(ids) if e < 0 else e
            if 0 <= nxt < end:  # a user turn never closed before the next one opens: up to that one
                end = nxt
            out.append((s, end))
            i = end if end > s else s

    def views(self, ids: Sequence[int]) -> list[list[int]]:
        """The single-turn requests a windows gate reads for one conversation: one per window of each user message
        longer than ``size`` tokens (none for shorter ones: the turn read already covers them)."""
        ids = [int(i) for i in ids]
        out = []
        for s, e in self.spans(ids):
            if e - s <= self.size:
                continue
            for ps, pe in self.paragraphs(ids, s, e):
                out += [list(self.prefix_ids) + ids[a:b] + list(self.close_ids) for a, b in self._windows(ps, pe)]
        return out

    def paragraphs(self, ids: Sequence[int], s: int, e: int) -> list[tuple[int, int]]:
        """``[start, end)`` of the pieces of the message ``ids[s:e]``: cut after every break token (``split="paragraphs"``;
        pieces of break tokens only are dropped), or the whole message (``"fixed"``)."""
        if not self.break_ids:
            return [(s, e)]
        brk = set(self.break_ids)
        out, a = [], s
        for i in range(s, e):
            if int(ids[i]) in brk:
                if any(int(t) not in brk for t in ids[a:i + 1]):
                    out.append((a, i + 1))
                a = i + 1
        if a < e:
            out.append((a, e))
        return out

    def _windows(self, s: int, e: int) -> list[tuple[int, int]]:
        """Windows of ``size`` every ``stride`` tokens over ``[s, e)`` (the last one ends at ``e``); one when shorter."""
        n = e - s
        if n <= self.size:
            return [(s, e)]
        starts = list(range(0, n - self.size + 1, self.stride))
        if starts[-1] != n - self.size:
            starts.append(n - self.size)  # the last window ends on the piece's last token
        return [(s + a, s + a + self.size) for a in starts]

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "stride": self.stride, "prefix_ids": list(self.prefix_ids),
                "open_ids": list(self.open_ids), "close_ids": list(self.close_ids),
                **({"break_ids": list(self.break_ids)} if self.break_ids else {})}

    @classmethod
    def from_dict(cls, d: Any, where: str = "policy") -> "WindowRead":
        ensure(isinstance(d, dict), f"{where}: window must be a JSON object")
        for k in ("size", "stride", "prefix_ids", "open_ids", "close_ids"):
            ensure(k in d, f"{where}: window is missing {k!r}")
        for k in ("prefix_ids", "open_ids", "close_ids", "break_ids"):
            ensure(k not in d or isinstance(d[k], list) and all(isinstance(i, int) and i >= 0 for i in d[k]),
                   f"{where}: window {k} must be a list of token ids")
        ensure(all(isinstance(d[k], int) for k in ("size", "stride")), f"{where}: window size and stride must be integers")
        return cls(size=d["size"], stride=d["stride"], prefix_ids=tuple(d["prefix_ids"]), open_ids=tuple(d["open_ids"]),
                   close_ids=tuple(d["close_ids"]), break_ids=tuple(sorted(set(d.get("break_ids") or ()))))


def line_break_ids(tok: Any) -> tuple[int, ...]:
    """Every vocabulary token whose text contains a line break (where ``split="paragraphs"`` cuts)."""
    vocab = tok.get_vocab()
    ids = sorted(vocab.values())
    texts = tok.batch_decode([[i] for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    special = set(getattr(tok, "all_special_ids", []) or [])
    return tuple(i for i, t in zip(ids, texts) if "\n" in t and i not in special)
