"""Request bodies of the OpenAI-compatible server (pydantic models with strict field types).

Field *types* are checked here (a wrong type: 422, as before); ranges and server limits are checked by
``saesteer.serve.server`` (400). OpenAI parameters the server does not implement are refused with 400
``unsupported_parameter`` unless they are given their no-op value (``presence_penalty: 0``, ``logit_bias: {}``,
``tools: []``, ``response_format: {"type": "text"}`` ...): a client never believes it got something it did not.
Fields that change nothing about the answer (``user``, ``metadata``, ``store``, ``service_tier``,
``parallel_tool_calls``) are accepted and ignored; any other unknown field is refused as unsupported.

Extension: ``steering`` (send it with the ``openai`` client's ``extra_body``), see :class:`SteeringRequest`.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr

Number = Union[StrictInt, StrictFloat]

HARMLESS = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prediction_id"})
"""Fields accepted and ignored: they do not change what the model generates."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # "name", "refusal", ... are checked in unsupported()

    role: StrictStr
    content: Union[StrictStr, list[dict[str, Any]], None]
    name: Optional[StrictStr] = None


class FeatureEdit(_Strict):
    """One SAE latent edit: exactly one of ``clamp`` (set the latent to a value), ``add`` (add value x the latent's
    decoder vector) or ``scale`` (multiply the latent), in the SAE's latent units."""

    sae: Optional[StrictStr] = None
    """Name of a server-allowed SAE (``GET /v1/steering``); may be omitted when the server allows exactly one."""
    feature: StrictInt
    clamp: Optional[Number] = None
    add: Optional[Number] = None
    scale: Optional[Number] = None


class SteeringRequest(_Strict):
    """``{"policy": "<served model name>"}`` and/or ``{"features": [FeatureEdit, ...], "positions": "all"}``."""

    policy: Optional[StrictStr] = None
    features: list[FeatureEdit] = []
    positions: StrictStr = "all"


class StreamOptions(_Strict):
    include_usage: Optional[StrictBool] = None


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: StrictStr
    max_tokens: Optional[StrictInt] = None
    temperature: Optional[Number] = None
    top_p: Optional[Number] = None
    n: Optional[StrictInt] = None
    stop: Union[StrictStr, list[StrictStr], None] = None
    seed: Optional[StrictInt] = None
    stream: Optional[StrictBool] = None
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[Number] = None
    frequency_penalty: Optional[Number] = None
    logit_bias: Optional[dict[str, Any]] = None
    steering: Union[StrictStr, SteeringRequest, None] = None

    def unsupported(self) -> list[str]:
        """Names of the parameters given with a value the server does not implement."""
        bad = [k for k in (self.model_extra or {}) if k not in HARMLESS]
        bad += [k for k in ("presence_penalty", "frequency_penalty") if getattr(self, k) not in (None, 0)]
        if self.logit_bias:
            bad.append("logit_bias")
        return bad


class ChatRequest(_Common):
    messages: list[Message]
    max_completion_tokens: Optional[StrictInt] = None
    logprobs: Optional[StrictBool] = None
    top_logprobs: Optional[StrictInt] = None
    response_format: Optional[dict[str, Any]] = None
    tools: Optional[list[Any]] = None
    tool_choice: Union[StrictStr, dict[str, Any], None] = None
    functions: Optional[list[Any]] = None
    function_call: Union[StrictStr, dict[str, Any], None] = None

    def unsupported(self) -> list[str]:
        bad = super().unsupported()
        if self.response_format not in (None, {"type": "text"}):
            bad.append("response_format")
        bad += [k for k in ("tools", "functions") if getattr(self, k)]
        bad += [k for k in ("tool_choice", "function_call") if getattr(self, k) not in (None, "none", "auto")]
        for i, m in enumerate(self.messages):
            bad += [f"messages[{i}].{k}" for k, v in (m.model_extra or {}).items() if v not in (None, [], "")]
        return bad


class CompletionRequest(_Common):
    prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]
    logprobs: Optional[StrictInt] = None
    echo: Optional[StrictBool] = None
    suffix: Optional[StrictStr] = None
    best_of: Optional[StrictInt] = None

    def unsupported(self) -> list[str]:
        bad = super().unsupported()
        if self.echo:
            bad.append("echo")
        if self.suffix:
            bad.append("suffix")
        if self.best_of not in (None, 1):
            bad.append("best_of")
        return bad


def format_validation_error(e: Any) -> str:
    """One line per problem: ``messages.0.content: Input should be a valid string``."""
    parts = []
    for err in e.errors()[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()))
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts)
