"""Parsing and validating request bodies (pydantic schema → decoded rows), resolving per-request steering within
the server's limits, and the error that becomes an OpenAI-shaped 4xx."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from saesteer.core import SaesteerError

from .engine import ServeConfig, ServedSteering, SteeringFactory

# --------------------------------------------------------------------------------------------- request parsing
ROLES = ("system", "user", "assistant")
_ROLE_ALIASES = {"developer": "system"}


class HTTPError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param


def _content(c: Any, i: int) -> str:
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    parts = []
    for p in c:  # [{"type": "text", "text": ...}, ...] (the schema checked it is a list of objects)
        if not (p.get("type") == "text" and isinstance(p.get("text"), str)):
            raise HTTPError(400, f"messages[{i}].content: only text parts are supported", code="unsupported_parameter",
                             param=f"messages[{i}].content")
        parts.append(p["text"])
    return "".join(parts)


def _bad_text(body: Any) -> str | None:
    """Where a string of the decoded JSON holds a lone surrogate (``"\\ud800"``): the tokenizer cannot encode it.

    Iterative: a body nested as deep as ``json.loads`` allows must not overflow the stack here."""
    stack: list[tuple[Any, str]] = [(body, "body")]
    while stack:
        x, path = stack.pop()
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                return path
        elif isinstance(x, dict):
            for k, v in x.items():
                stack.append((k, path))
                stack.append((v, f"{path}.{k}" if isinstance(k, str) and len(path) < 200 else path))
        elif isinstance(x, list):
            stack.extend((v, f"{path}[{i}]" if len(path) < 200 else path) for i, v in enumerate(x))
    return None


def _range(v: Any, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    if v is None:
        return default
    f = float(v)
    if not (lo < f <= hi if lo_open else lo <= f <= hi):  # also NaN / inf (json.loads reads NaN, Infinity)
        raise HTTPError(400, f"{key} must be a number in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}", param=key)
    return f


def _int_range(v: Any, key: str, default: int, lo: int, hi: int) -> int:
    if v is None:
        return default
    if not lo <= v <= hi:
        raise HTTPError(400, f"{key} must be between {lo} and {hi}, got {v}", param=key)
    return int(v)


@dataclass
class ResolvedSteering:
    config: str | None
    """Name of the served config used (``None``: unsteered)."""
    factory: SteeringFactory | None
    """Opaque served factory (policy / extra), or None."""
    interventions: list[Any]
    echo: dict[str, Any]


def _resolve_steering(st: Any, name: str, served: dict[str, Any], saes: dict[str, Any], cfg: ServeConfig) -> ResolvedSteering:
    from saesteer.steering import POSITIONS, Add, Clamp, Scale

    policy = st if isinstance(st, str) else getattr(st, "policy", None)
    feats = list(getattr(st, "features", None) or [])
    positions = getattr(st, "positions", "all")
    config = name
    if policy is not None:
        if policy not in served:
            raise HTTPError(400, f"unknown steering policy {policy!r}; served: {', '.join(served)}", param="steering")
        if served[name] is not None and name != policy:
            raise HTTPError(400, f"model {name!r} is steered already; steering.policy {policy!r} would replace it "
                             "(use the unsteered model name with steering.policy)", param="steering")
        config = policy
    factory = served[config]
    opaque = factory is not None and not isinstance(factory, ServedSteering)
    if positions not in POSITIONS:
        raise HTTPError(400, f"steering.positions must be one of {', '.join(POSITIONS)}, got {positions!r}",
                         param="steering.positions")
    if feats and not saes:
        raise HTTPError(400, "per-request feature steering is off on this server (it allows no SAE)",
                         code="unsupported_parameter", param="steering.features")
    if feats and opaque:
        raise HTTPError(400, f"per-request features cannot be combined with {config!r} (a policy); send them with an "
                         "unsteered or spec-steered model", param="steering.features")
    if len(feats) > cfg.steer_max_features:
        raise HTTPError(400, f"too many steering features: {len(feats)} > {cfg.steer_max_features}",
                         param="steering.features")
    ivs = list(factory.interventions) if isinstance(factory, ServedSteering) else []
    echo_feats = []
    for i, fe in enumerate(feats):
        where = f"steering.features[{i}]"
        sae_name = fe.sae if fe.sae is not None else (next(iter(saes)) if len(saes) == 1 else None)
        if sae_name is None:
            raise HTTPError(400, f"{where}.sae is required (allowed: {', '.join(saes)})", param=where)
        if sae_name not in saes:
            raise HTTPError(400, f"{where}: SAE {sae_name!r} is not allowed on this server (allowed: "
                             f"{', '.join(saes)})", param=where)
        given = [(k, getattr(fe, k)) for k in ("clamp", "add", "scale") if getattr(fe, k) is not None]
        if len(given) != 1:
            raise HTTPError(400, f"{where} needs exactly one of clamp, add, scale", param=where)
        kind, v = given[0]
        lim = cfg.steer_max_scale if kind == "scale" else cfg.steer_max_value
        _range(v, f"{where}.{kind}", 0.0, -lim, lim)
        sae = saes[sae_name]
        try:
            if kind == "clamp":
                iv = Clamp(sae=sae, features=[fe.feature], values=[float(v)], positions=positions)
            elif kind == "scale":
                iv = Scale(sae=sae, features=[fe.feature], factor=float(v), positions=positions)
            else:
                iv = Add(sae=sae, feature=fe.feature, alpha=float(v), positions=positions)
        except SaesteerError as e:
            raise HTTPError(400, f"{where}: {e}", param=where) from None
        ivs.append(iv)
        echo_feats.append({"sae": sae_name, "feature": fe.feature, kind: float(v)})
    echo = {"policy": config if factory is not None else None, "features": echo_feats, "positions": positions}
    return ResolvedSteering(config if factory is not None else None, factory if opaque else None, ivs, echo)


def _validate(schema: Any, body: Any) -> Any:
    from pydantic import ValidationError

    from saesteer.serve.schema import format_validation_error

    if not isinstance(body, dict):
        raise HTTPError(422, "the request body must be a JSON object")
    bad = _bad_text(body)
    if bad:
        raise HTTPError(400, f"{bad}: invalid text (a lone UTF-16 surrogate such as \\ud800 cannot be encoded)",
                         param=bad)
    if not isinstance(body.get("model"), str):
        raise HTTPError(422, "model is required (a string)", param="model")
    try:
        return schema.model_validate(body)
    except ValidationError as e:
        raise HTTPError(422, format_validation_error(e)) from None


def _common(req: Any, cfg: ServeConfig, served: dict[str, Any], saes: dict[str, Any], max_tokens: Any,
            default_max_tokens: int) -> dict[str, Any]:
    if req.model not in served:
        raise HTTPError(404, f"unknown model {req.model!r}; served: {', '.join(served)}", code="model_not_found",
                         param="model")
    bad = req.unsupported()
    if bad:
        raise HTTPError(400, f"unsupported parameter(s): {', '.join(bad)} (this server does not implement them)",
                         code="unsupported_parameter", param=bad[0])
    mt = min(default_max_tokens, cfg.max_tokens_limit) if max_tokens is None else max_tokens
    if not 1 <= mt <= cfg.max_tokens_limit:
        raise HTTPError(400, f"max_tokens must be between 1 and {cfg.max_tokens_limit}, got {mt}", param="max_tokens")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4 or not all(stop):
        raise HTTPError(400, "stop must be a non-empty string or a list of at most 4 non-empty strings", param="stop")
    if req.seed is not None and not -(2**63) <= req.seed < 2**63:
        raise HTTPError(400, f"seed must fit in 64 bits, got {req.seed}", param="seed")
    stream = bool(req.stream)
    if req.stream_options is not None and not stream:
        raise HTTPError(400, "stream_options is only allowed with stream: true", param="stream_options")
    return {"model": req.model, "max_tokens": mt, "stop": stop, "seed": req.seed,
            "temperature": _temperature(_range(req.temperature, "temperature", 1.0, 0.0, 2.0)),
            "top_p": _range(req.top_p, "top_p", 1.0, 0.0, 1.0, lo_open=True),
            "n": _int_range(req.n, "n", 1, 1, cfg.max_n), "stream": stream,
            "include_usage": bool(req.stream_options and req.stream_options.include_usage),
            "steer": _resolve_steering(req.steering, req.model, served, saes, cfg)}


MIN_TEMPERATURE = 1e-4
"""Temperatures below this decode greedily (logits / 1e-313 overflow to inf; the limit is the argmax anyway)."""


def _temperature(t: float) -> float:
    return t if t >= MIN_TEMPERATURE else 0.0


def parse_request(body: Any, cfg: ServeConfig, served: dict[str, Any], saes: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    """Validate a chat-completions body; returns the settings the rows need. Raises ``HTTPError``."""
    from saesteer.serve.schema import ChatRequest

    req = _validate(ChatRequest, body)
    if req.model not in served:
        raise HTTPError(404, f"unknown model {req.model!r}; served: {', '.join(served)}", code="model_not_found",
                         param="model")
    if not req.messages:
        raise HTTPError(422, "messages must be a non-empty list", param="messages")
    if len(req.messages) > cfg.max_messages:
        raise HTTPError(400, f"too many messages: {len(req.messages)} > {cfg.max_messages}", param="messages")
    conv = []
    for i, m in enumerate(req.messages):
        role = _ROLE_ALIASES.get(m.role, m.role)
        if role not in ROLES:
            raise HTTPError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.role!r}",
                             param=f"messages[{i}].role")
        conv.append({"role": role, "content": _content(m.content, i)})
    p = _common(req, cfg, served, saes or {}, req.max_completion_tokens if req.max_completion_tokens is not None
                else req.max_tokens, cfg.default_max_tokens)
    if req.top_logprobs is not None and not req.logprobs:
        raise HTTPError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    logprobs = _int_range(req.top_logprobs, "top_logprobs", 0, 0, 20) if req.logprobs else None
    if logprobs is not None and p["stream"]:
        raise HTTPError(400, "logprobs with stream: true is not supported (ask without streaming)",
                         code="unsupported_parameter", param="logprobs")
    p.update(messages=conv, logprobs=logprobs)
    return p


def parse_completion(body: Any, cfg: ServeConfig, served: dict[str, Any], saes: dict[str, Any] | None = None
                     ) -> dict[str, Any]:
    """Validate a (legacy) completions body: ``prompt`` is a string, a list of strings, token ids or lists of them."""
    from saesteer.serve.schema import CompletionRequest

    req = _validate(CompletionRequest, body)
    p = _common(req, cfg, served, saes or {}, req.max_tokens, 16)
    prompt = req.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt or any(len(x) == 0 for x in prompt):
        raise HTTPError(400, "prompt must be non-empty", param="prompt")
    if len(prompt) * p["n"] > cfg.max_n:
        raise HTTPError(400, f"{len(prompt)} prompts x n={p['n']} completions is more than {cfg.max_n}", param="prompt")
    if req.logprobs is not None and p["stream"]:
        raise HTTPError(400, "logprobs with stream: true is not supported (ask without streaming)",
                         code="unsupported_parameter", param="logprobs")
    p.update(prompts=prompt, logprobs=_int_range(req.logprobs, "logprobs", 0, 0, 20) if req.logprobs is not None
             else None)
    return p
