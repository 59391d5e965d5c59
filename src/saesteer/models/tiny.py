"""Tiny random models and a tiny tokenizer built in-process, for tests and quick experiments (no downloads).

``tiny_model("llama")`` returns ``(model, tokenizer)``: a 2-layer model with a ChatML chat template, fast on CPU.
"""

from __future__ import annotations

from typing import Any

import torch

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "how do i make a cake? here is a simple recipe with flour, sugar and eggs",
    "i'm sorry, but i can't assist with that request.",
    "sure, here is how you can write a python function that reverses a string",
    "explain photosynthesis in simple terms: plants turn light into chemical energy",
    "what is the capital of france? the capital of france is paris.",
    "abcdefghijklmnopqrstuvwxyz 0123456789 .,;:!?'\"-()[]{}<>/\\_*#=+",
]


def tiny_tokenizer(vocab_size: int = 384) -> Any:
    """A byte-level BPE tokenizer trained on a few sentences, with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHATML
    tok.padding_side = "left"
    return tok


def tiny_config(arch: str = "llama", vocab_size: int = 384, hidden: int = 64, layers: int = 2) -> Any:
    """A small random config of the given architecture family (special ids match :func:`tiny_tokenizer`)."""
    import transformers as tf

    ids = dict(bos_token_id=None, eos_token_id=2, pad_token_id=0)
    common = dict(vocab_size=vocab_size, num_hidden_layers=layers, **ids)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=vocab_size, n_layer=layers, n_embd=hidden, n_head=4, n_positions=256, **ids)
    dims = dict(hidden_size=hidden, intermediate_size=hidden * 2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=256, **common)
    if arch == "llama":
        return tf.LlamaConfig(**dims, tie_word_embeddings=True)
    if arch == "qwen2":
        return tf.Qwen2Config(**dims)
    if arch == "mistral":
        return tf.MistralConfig(**dims)
    if arch == "gemma":
        return tf.GemmaConfig(**dims, head_dim=hidden // 4)
    if arch == "gemma2":
        return tf.Gemma2Config(**dims, head_dim=hidden // 4)
    if arch == "phi3":
        return tf.Phi3Config(**dims)
    raise ValueError(f"unknown tiny arch {arch!r}")


ARCHS = ("llama", "qwen2", "mistral", "gemma", "gemma2", "phi3", "gpt2")


def tiny_model(arch: str = "llama", seed: int = 0, layers: int = 2, hidden: int = 64,
               weight_std: float | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)``: a random ``arch`` causal LM in fp32 eval mode, named ``tiny-<arch>``.

    ``weight_std``: redraw every 2-D weight from N(0, weight_std²) (fixed generator, seed 1) — larger weights than the
    initialiser's, so that greedy outputs vary instead of repeating one token."""
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size=len(tok), hidden=hidden, layers=layers))
    model.float().eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    if weight_std is not None:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.copy_(torch.randn(p.shape, generator=g) * weight_std)
    model.saesteer_name = f"tiny-{arch}"
    return model, tok


def hook_state(model: Any) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Ids of every forward and forward-pre hook on every submodule: compare before / after a ``steer`` block to
    check that it removed exactly its own hooks (transformers installs output-capturing hooks of its own the first
    time a model is asked for hidden states, so "no hooks at all" is the wrong test on a shared model)."""
    return {name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for name, m in model.named_modules()}
