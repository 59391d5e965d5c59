"""Options many commands share, declared once.

:func:`steering_options` adds the steering options (``--sae --feature --clamp --alpha --direction
--ablate-direction --layer --positions --spec --policy --name``, or the subset a command names) to a command and
hands it one :class:`SteeringOptions`; :meth:`SteeringOptions.to_steering` is the library's one translator,
:func:`saesteer.gating.steering_from_options`, which the lm-eval model uses too. ``--feature`` and ``--clamp`` take
one value, several comma-separated, or repeats. :data:`EXCLUDE_HELP` / :func:`read_exclude` are the one
``--exclude`` format.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from saesteer.core import SaesteerError, read_json
from saesteer.models import DEFAULT_MODEL

PANEL = "Steering"
MODEL_HELP = "built-in model name (see `saesteer models`), local HF folder, local .gguf file or hub id"
DEVICE_HELP = "cpu, cuda, cuda:N or auto"
THREADS_HELP = "torch intra-op threads (default: SAESTEER_THREADS or torch's default)"
EXCLUDE_HELP = ("item ids to leave out: a JSON list of ids, or a JSON object with an \"exclude_ids\" list (e.g. the "
                "selection.json of `saesteer features`); ids are `<dataset>/<id>` or plain `<id>`")

BROKEN_HELP = ("label broken (incoherent) answers: unsteered log-likelihood far below the unsteered answers', or "
               "repeated 3-grams; reported as refusal / compliance / broken")
BROKEN_MAD_OPT = typer.Option(3.5, help="broken label: unlikely when the mean token log-likelihood is below median - C * "
                              "1.4826 * MAD of the unsteered answers' (this C; 0 = off)")
BROKEN_REPEAT_OPT = typer.Option(0.5, help="broken label: degenerate when more than this share of word 3-grams repeats "
                                 "(1 = off)")
LONG_CHECK_OPT = typer.Option(0, help="regenerate a seeded sample of N prompts at --long-tokens and report how often "
                              "the verdict changes (0 = off; e.g. 100)")
LONG_TOKENS_OPT = typer.Option(256, help="answer budget of the long-answer verdict check")


def model_option() -> Any:
    return typer.Option(DEFAULT_MODEL, help=MODEL_HELP)


@dataclass
class SteeringOptions:
    """The steering options of one command invocation (unset ones are None / empty)."""

    sae: Optional[Path] = None
    feature: List[str] = field(default_factory=list)
    clamp: List[str] = field(default_factory=list)
    alpha: Optional[float] = None
    direction: Optional[Path] = None
    ablate_direction: bool = False
    layer: Optional[int] = None
    positions: str = "all"
    spec: Optional[Path] = None
    policy: Optional[Path] = None
    name: Optional[str] = None

    def to_steering(self) -> Any:
        """The library :class:`~saesteer.steering.Steering` (None: unsteered)."""
        from saesteer.gating import steering_from_options

        return steering_from_options(
            sae=self.sae, feature=self.feature, clamp=self.clamp, alpha=self.alpha, direction=self.direction,
            ablate_direction=self.ablate_direction, layer=self.layer, positions=self.positions, spec=self.spec,
            policy=self.policy, name=self.name)

    def specs(self) -> list:
        """Only the specs (a policy's own steering): no ``--policy``."""
        from saesteer.gating import specs_from_options

        return list(specs_from_options(
            sae=self.sae, feature=self.feature, clamp=self.clamp, alpha=self.alpha, direction=self.direction,
            ablate_direction=self.ablate_direction, layer=self.layer, positions=self.positions, spec=self.spec))


def _declare(name: str, short: bool) -> tuple[Any, Any]:
    """(annotation, typer.Option) of one steering option — the only place they are declared."""
    o = functools.partial(typer.Option, rich_help_panel=PANEL)
    decl = {
        "sae": (Optional[Path], o(None, help="SAE folder (ours, SAELens, sparsify, Gemma Scope, dictionary_learning; "
                                               "FOLDER:HOOKPOINT picks one of several)")),
        "feature": (Optional[List[str]], o(None, "--feature", *(["-f"] if short else []),
                                           help="SAE latent index; several: comma-separated or repeated")),
        "clamp": (Optional[List[str]], o(None, "--clamp", *(["-c"] if short else []),
                                         help="clamp value(s) in the SAE's latent units (one, or one per feature)")),
        "alpha": (Optional[float], o(None, help="activation-addition coefficient (--direction: default 1; or one "
                                                "--feature without --clamp)")),
        "direction": (Optional[Path], o(None, help="refusal-direction file from `saesteer direction`")),
        "ablate_direction": (bool, o(False, "--ablate-direction", help="project --direction out at every layer")),
        "layer": (Optional[int], o(None, help="layer to steer (default: the SAE's / direction's layer)")),
        "positions": (str, o("all", help="positions steered: all / prompt / generated")),
        "spec": (Optional[Path], o(None, help="steering spec JSON (one spec, a list, or {\"steering\": [...]})")),
        "policy": (Optional[Path], o(None, help="conditional steering policy file (from `saesteer policy fit`)")),
        "name": (Optional[str], o(None, help="name recorded for this steering config (default: derived from the "
                                             "options)")),
    }
    return decl[name]


EVAL_STEERING = ("sae", "feature", "clamp", "alpha", "direction", "spec", "policy", "name")
"""The steering options of the eval commands (``eval refusal | multiturn | capability``)."""
ALL = ("sae", "feature", "clamp", "alpha", "direction", "ablate_direction", "layer", "positions", "spec", "policy",
       "name")


def steering_options(*names: str, short: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: add the steering options ``names`` (default: all) after the command's own parameters and pass them
    as ``steering: SteeringOptions`` (the command declares a ``steering`` parameter, which is not an option).
    ``short``: also ``-f`` / ``-c`` for ``--feature`` / ``--clamp``."""
    chosen = names or ALL
    unknown = set(chosen) - set(ALL)
    if unknown:
        raise ValueError(f"unknown steering options: {sorted(unknown)}")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn)
        own = [p for p in sig.parameters.values() if p.name != "steering"]
        added = []
        annotations = {k: v for k, v in fn.__annotations__.items() if k != "steering"}
        for n in chosen:
            ann, opt = _declare(n, short)
            added.append(inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=ann))
            annotations[n] = ann

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            vals = {n: kwargs.pop(n) for n in chosen if n in kwargs}
            for n in ("feature", "clamp"):
                vals[n] = list(vals.get(n) or [])
            kwargs["steering"] = SteeringOptions(**vals)
            return fn(*args, **kwargs)

        keyword_own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.kind == inspect.Parameter.VAR_KEYWORD else p
                       for p in own]
        wrapper.__signature__ = sig.replace(parameters=keyword_own + added)  # type: ignore[attr-defined]
        wrapper.__annotations__ = annotations
        return wrapper

    return deco


def read_exclude(path: Optional[Path]) -> list[str]:
    """The ids of an ``--exclude`` file (:data:`EXCLUDE_HELP`); [] when no file is given.

    A JSON list is taken as it is. From an object: every list under a key mentioning ``ids``, and from a features
    ``selection.json`` (``prompts_used``) each prompt as ``<spec>/<id>``, ``<spec>:<split>/<id>`` and
    ``text:<hash of its text>`` (so that a prompt is excluded whichever way a consumer names it)."""
    if path is None:
        return []
    obj = read_json(path, "--exclude file")
    if isinstance(obj, list):
        return [str(i) for i in obj]
    if not isinstance(obj, dict):
        raise SaesteerError(f"--exclude {path}: expected a JSON list of ids, an object with id lists, or a features "
                            "selection.json")
    id_lists = [v for k, v in obj.items() if "ids" in k.lower() and isinstance(v, list)]
    if not id_lists and not isinstance(obj.get("prompts_used"), dict):
        raise SaesteerError(f"--exclude {path}: no id list (a key with \"ids\" in its name) and no \"prompts_used\"")
    out = [str(i) for v in id_lists for i in v]
    if isinstance(obj.get("prompts_used"), dict):
        from saesteer.gating import text_key

        recs = [r for rs in obj["prompts_used"].values() if isinstance(rs, list) for r in rs
                if isinstance(r, dict) and "id" in r]
        out += [f"{r.get('spec')}/{r['id']}" for r in recs]
        out += [f"{r.get('spec')}:{r.get('split')}/{r['id']}" for r in recs if r.get("split")]
        out += [f"text:{text_key(r['prompt'])}" for r in recs if r.get("prompt")]
    return out
