"""Hook point names → our layer index (the decoder layer whose *output* the SAE reads).

``blocks.L.hook_resid_post`` (TransformerLens / SAELens), ``model.layers.L`` / ``layers.L`` / ``transformer.h.L`` /
``gpt_neox.layers.L`` (HF module names: sparsify, dictionary_learning), ``model.layers.L.output`` (Gemma Scope 2
``hf_hook_point_in``), ``resid_post_layer_L`` (dictionary_learning), and Gemma Scope folder names
(``layer_L/width_16k/average_l0_N`` in a ``*-res`` release, ``resid_post/layer_L_width_16k_l0_small``) all map to
layer ``L``. ``blocks.L.hook_resid_pre`` is the output of layer ``L - 1`` (``L = 0`` reads the embeddings, which we do
not steer). Hook points that are not the residual stream between blocks (MLP / attention outputs, ``hook_z``,
``hook_resid_mid``, sub-modules such as ``layers.L.mlp``) are rejected with one clear error; an unrecognised name
gives layer -1 (unknown: the caller must name the layer).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from saesteer.core import SaesteerError

_NOT_RESID = re.compile(
    r"(hook_mlp_out|hook_mlp_in|hook_attn_out|hook_z\b|attn\.|hook_resid_mid|hook_embed|hook_pos_embed|ln\d|"
    r"\.mlp\b|\.self_attn\b|\.attn\b|layernorm|_mlp\b|-mlp\b|-att\b|mlp_out|attn_out|att_out|transcoder|\bclt\b|"
    r"embedding)")


def _reject(name: str) -> None:
    raise SaesteerError(f"hook point {name!r} is not the residual stream after a decoder layer; saesteer steers "
                        f"residual-stream SAEs (resid_post of block L, or model.layers.L output)")


def layer_from_hookpoint(name: str) -> int:
    """Our layer for a hook point / folder name; -1 when it names none. Raises for non-residual hook points."""
    s = (name or "").strip().replace("\\", "/")
    if not s:
        return -1
    m = re.search(r"blocks\.(\d+)\.hook_resid_(pre|post)\b", s)
    if m:
        layer = int(m.group(1)) - (1 if m.group(2) == "pre" else 0)
        if layer < 0:
            raise SaesteerError(f"hook point {name!r} reads the embeddings (resid_pre of block 0); saesteer steers "
                                f"the output of a decoder layer")
        return layer
    if _NOT_RESID.search(s):
        _reject(name)
    m = re.search(r"resid_(pre|post)_layer_?(\d+)", s)
    if m:
        layer = int(m.group(2)) - (1 if m.group(1) == "pre" else 0)
        if layer < 0:
            _reject(name)
        return layer
    m = re.search(r"(?:^|[./])(?:layers|h|blocks)\.(\d+)(?:\.output)?$", s)
    if m:
        return int(m.group(1))
    m = re.search(r"(?:^|/)layer_(\d+)(?:[_/]|$)", s)  # Gemma Scope folders
    if m:
        return int(m.group(1))
    return -1


def model_from_gemmascope_path(path: str) -> str:
    """``gemma-scope-2b-pt-res`` → ``google/gemma-2-2b``; ``gemma-scope-9b-it-res`` → ``google/gemma-2-9b-it``;
    ``gemma-scope-2-1b-it`` → ``google/gemma-3-1b-it``; "" when the path names no release."""
    m = re.search(r"gemma-scope-2-(\d+[mb])-(pt|it)", path)
    if m:
        return f"google/gemma-3-{m.group(1)}" + ("-it" if m.group(2) == "it" else "-pt")
    m = re.search(r"gemma-scope-(\d+b)-(pt|it)", path)
    if m:
        return f"google/gemma-2-{m.group(1)}" + ("-it" if m.group(2) == "it" else "")
    return ""


def same_model(a: str, b: str) -> bool:
    """Model names match up to the hub organisation and case (``gemma-2-2b`` = ``google/gemma-2-2b``)."""
    return _bare_name(a) == _bare_name(b)


def _bare_name(s: str) -> str:
    """A hub model name without its organisation, in lower case."""
    return s.strip().rstrip("/").split("/")[-1].lower()


CHAT_SUFFIXES = ("-it", "-instruct", "-chat")
"""Hub name endings of a chat fine-tune of a pre-trained model (``gemma-2-2b-it``, ``Llama-3.1-8B-Instruct``)."""


def base_of(base: str, chat: str) -> bool:
    """``chat`` is named as the chat fine-tune of ``base`` (``gemma-2-2b`` → ``google/gemma-2-2b-it``,
    ``Llama-3.1-8B`` → ``meta-llama/Llama-3.1-8B-Instruct``), up to the hub organisation and case. Public SAEs are
    often trained on the base model and applied to its chat model (Gemma Scope 2B, Llama Scope)."""
    b, c = _bare_name(base), _bare_name(chat)
    return any(c == b + suffix for suffix in CHAT_SUFFIXES)


def split_hookpoint(path: str | os.PathLike, hookpoint: str | None = None) -> tuple[Path, str | None]:
    """``FOLDER:HOOKPOINT`` → (FOLDER, HOOKPOINT) when the whole string is not an existing path."""
    s = str(path)
    if hookpoint is None and ":" in s and not Path(s).exists():
        base, _, hp = s.rpartition(":")
        if base and hp and Path(base).expanduser().exists():
            return Path(base).expanduser(), hp
    return Path(s).expanduser(), hookpoint


def sae_path_exists(path: str | os.PathLike) -> bool:
    """Whether an SAE path (``FOLDER`` or ``FOLDER:HOOKPOINT``) names something on disk."""
    return split_hookpoint(path)[0].exists()
