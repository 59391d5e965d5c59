"""An lm-evaluation-harness model, ``saesteer``: the harness's HFLM with saesteer's steering hooks.

lm-eval 0.4.13 finds models only in its own registry (no plugin entry points), so run the harness through this
module, which registers the model and then hands over to lm-eval's own CLI (every lm-eval option works)::

    python -m saesteer.evals.lmeval run --model saesteer \\
        --model_args pretrained=qwen2.5-coder-0.5b-instruct,sae=runs/sae-qwen-l12,feature=981,clamp=6 \\
        --tasks mmlu_local --include_path my_tasks/ --device cpu --batch_size 8

(``saesteer eval lm-eval ...`` is the same). From Python, ``import saesteer.evals.lmeval`` registers it, then
``lm_eval.simple_evaluate(model="saesteer", model_args="pretrained=...,sae=...,feature=...,clamp=...")``.

model_args (all optional except ``pretrained``):

- ``pretrained``: a built-in name (``saesteer models``; GGUF built-ins load through ``models.load_model``), a local
  HF folder, a ``.gguf`` file or a hub id.
- ``sae``, ``feature``, ``clamp``: clamp SAE latent(s) ``feature`` to ``clamp`` (latent units). Several features:
  ``feature=12+34,clamp=6+4`` (``+`` because the harness splits model_args on commas).
- ``direction``, ``alpha``: add ``alpha`` × a refusal direction file (``saesteer direction``).
- ``spec``: a steering-spec JSON file (``steering.load_specs``); ``layer`` overrides the steered layer.
- ``policy``: a conditional-steering policy file (``policy.load_policy``); its system prompt, if any, is put first in
  every ``--apply_chat_template`` prompt (raw harness contexts have no system message to carry it). HFLM right-pads log-likelihood batches
  without an attention mask, so a policy gate that reads the last prompt positions is exact only with
  ``--batch_size 1``, which is therefore required with ``policy``.
- ``dtype`` (default float32) and the usual HFLM arguments (``batch_size``, ``max_length``, ...).

Steering hooks are installed around every forward the harness makes (``_model_call``: loglikelihood and
loglikelihood_rolling) and around ``_model_generate`` (generate_until), and removed afterwards.
Chat-formatted capability tasks: the harness's own generative tasks run steered through this model since
``generate_until`` is steered, e.g. ``--tasks humaneval_instruct --apply_chat_template --confirm_run_unsafe_code``
(with ``HF_ALLOW_CODE_EVAL=1``), ``--tasks gsm8k_cot_zeroshot --apply_chat_template`` or ``--tasks
mmlu_generative --apply_chat_template``. Their datasets come from the HF hub, and lm-eval executes HumanEval code
with HF ``evaluate``'s ``code_eval`` (in-process ``exec`` with its own guards), not saesteer's sandbox; for the
offline, sandboxed versions use ``saesteer eval capability --tasks humaneval,gsm8k_chat,mmlu_chat``.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, Iterator

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from saesteer.core import SaesteerError, ensure, resolve_device
from saesteer.models import DEFAULT_MODEL


def steering_from_args(
    sae: str | None = None, feature: Any = None, clamp: Any = None, direction: str | None = None,
    alpha: Any = None, spec: str | None = None, policy: str | None = None, layer: Any = None,
) -> Any:
    """A :class:`saesteer.steering.Steering` from lm-eval style model_args (None when nothing asks for steering),
    through the same translator as every command's steering options (:func:`saesteer.gating.steering_from_options`;
    lists may be written ``1+2`` since model_args are comma-separated)."""
    from saesteer.gating import steering_from_options

    if not sae and (feature not in (None, "") or clamp not in (None, "")):
        raise SaesteerError("SAE steering needs sae=PATH, feature=F and clamp=C together")
    return steering_from_options(
        sae=sae or None, feature=feature, clamp=clamp, direction=direction or None,
        alpha=float(alpha) if alpha not in (None, "") else None, spec=spec or None, policy=policy or None,
        layer=int(layer) if layer not in (None, "") else None,
    )


@register_model("saesteer")
class SaesteerLM(HFLM):
    """HFLM whose forwards and generations run under saesteer steering (see the module docstring)."""

    def __init__(
        self, pretrained: Any = DEFAULT_MODEL, sae: str | None = None, feature: Any = None,
        clamp: Any = None, direction: str | None = None, alpha: Any = None, spec: str | None = None,
        policy: str | None = None, layer: Any = None, device: str | None = "cpu", dtype: Any = "auto",
        tokenizer: Any = None, steering: Any = None, **kwargs: Any,
    ) -> None:
        if isinstance(pretrained, str):
            from saesteer.models import load_model

            dev = resolve_device(device)
            model, tok = load_model(pretrained, device=dev, dtype=dtype)
        else:  # an already loaded model (tests, notebooks)
            ensure(tokenizer is not None, "pass tokenizer= together with a loaded model")
            model, tok = pretrained, tokenizer
        kwargs.pop("trust_remote_code", None)
        super().__init__(pretrained=model, tokenizer=tok, **kwargs)
        built = steering_from_args(sae, feature, clamp, direction, alpha, spec, policy, layer)
        ensure(built is None or steering is None, "pass steering= or steering model_args, not both")
        self.steering = steering if steering is not None else built
        self.steering_calls = 0
        if getattr(self.steering, "policy", None) is not None and str(self.batch_size_per_gpu) != "1":
            raise SaesteerError("a policy gate reads the last prompt tokens, but lm-eval right-pads log-likelihood "
                                "batches without a mask: use --batch_size 1 with policy=...")

    @contextlib.contextmanager
    def _steered(self) -> Iterator[None]:
        if self.steering is None:
            yield
            return
        from .capability import steering_context

        self.steering_calls += 1
        with steering_context(self.model, self.steering):
            yield

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """HFLM's chat formatting (``--apply_chat_template``) with a policy's system prompt put first, as every
        saesteer eval does under that policy (``models.to_messages(system_prefix=...)``)."""
        prefix = getattr(getattr(self.steering, "policy", None), "system", None)
        if prefix:
            from saesteer.models import to_messages

            chat_history = to_messages(chat_history, system_prefix=prefix)
        return super().apply_chat_template(chat_history, add_generation_prompt)

    def _model_call(self, inps: Any, attn_mask: Any = None, labels: Any = None) -> Any:
        with self._steered():
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

    def _model_generate(self, context: Any, max_length: int, stop: list[str], **generation_kwargs: Any) -> Any:
        with self._steered():
            return super()._model_generate(context, max_length, stop, **generation_kwargs)


def write_mmlu_task(task_dir: str | Path, rows: list[dict], name: str = "saesteer_mmlu", shots: list[dict] = ()) -> Path:
    """A local lm-eval task YAML (+ its JSONL data) in the harness's MMLU format for exactly ``rows``.

    Rows carry subject / question / choices / answer (as in ``mmlu_test.jsonl``). ``shots`` become the ``dev`` split
    read with the harness's ``first_n`` sampler, so they must all be of the rows' subject to match
    :func:`saesteer.data.mmlu_prompt`. Run it with ``--include_path task_dir --tasks name``.
    """
    import json

    d = Path(task_dir)
    d.mkdir(parents=True, exist_ok=True)
    data = {"test": d / f"{name}_test.jsonl", "dev": d / f"{name}_dev.jsonl"}
    for split, rs in (("test", rows), ("dev", list(shots) or rows[:1])):
        data[split].write_text("".join(json.dumps(r) + "\n" for r in rs), encoding="utf-8")
    yaml = f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data["test"].resolve()))}
    dev: {json.dumps(str(data["dev"].resolve()))}
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
num_fewshot: {len(shots)}
output_type: multiple_choice
description: "The following are multiple choice questions (with answers) about {{{{subject.replace('_', ' ')}}}}.\\n\\n"
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\nC. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
    (d / f"{name}.yaml").write_text(yaml, encoding="utf-8")
    return d / f"{name}.yaml"


def main(argv: list[str] | None = None) -> None:
    """lm-eval's own CLI with the ``saesteer`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
