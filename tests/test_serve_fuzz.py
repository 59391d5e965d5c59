"""Property-based fuzz test of the request schema: no input gives a 500 or a non-JSON body; /health keeps answering.

Bounded: ``SAESTEER_FUZZ_EXAMPLES`` examples per endpoint (default 60; every generated request decodes at most 3
tokens of the tiny model), so it runs in ``make test``.
"""

from __future__ import annotations

import json
import os

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sae_double import make_sae  # noqa: E402
from saesteer.models import model_name  # noqa: E402
from saesteer.serve import ServeConfig, ServedSteering, make_app  # noqa: E402
from saesteer.steering import Clamp  # noqa: E402

KEY = "k"
H = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
EXAMPLES = int(os.environ.get("SAESTEER_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def http():
    from fastapi.testclient import TestClient

    from saesteer.models import tiny_model

    model, tok = tiny_model("llama")
    sae = make_sae(64, 32, 4, layer=0, model=model_name(model))
    served = {"default": None, "default+c": ServedSteering([Clamp(sae=sae, features=[1], values=[3.0])])}
    app = make_app(model, tok, served, ServeConfig(api_key=KEY, max_tokens_limit=3, default_max_tokens=2,
                                                   max_prompt_tokens=256, max_body_bytes=50_000, batch_wait_ms=1,
                                                   max_n=3),
                   saes={"main": sae})
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c
    app.state.engine.close()


scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["default", "default+c", "user", "text", "\ud800", "all"]))
json_any = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                        max_leaves=8)
small_int = st.one_of(st.integers(-3, 6), json_any)
number = st.one_of(st.floats(-3, 3, allow_nan=False), st.integers(-3, 3), json_any)
text = st.one_of(st.text(max_size=30), st.sampled_from(["hi", "a\ud800b", "\x00", "<|im_end|>"]))
message = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["user", "system", "assistant", "developer", "tool"]), json_any),
     "content": st.one_of(text, st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]),
                                                                "text": text}), max_size=2), json_any)},
    optional={"name": st.one_of(text, json_any), "tool_calls": json_any})
feature = st.fixed_dictionaries({"feature": small_int}, optional={
    "sae": st.one_of(st.sampled_from(["main", "x"]), json_any), "clamp": number, "add": number, "scale": number})
steering = st.one_of(st.sampled_from(["default+c", "nope"]), json_any, st.fixed_dictionaries({}, optional={
    "policy": st.one_of(st.sampled_from(["default", "default+c", "x"]), json_any),
    "features": st.one_of(st.lists(feature, max_size=3), json_any),
    "positions": st.one_of(st.sampled_from(["all", "prompt", "generated", "x"]), json_any)}))
common = {"max_tokens": small_int, "temperature": number, "top_p": number, "n": small_int,
          "stop": st.one_of(text, st.lists(text, max_size=5), json_any), "seed": st.one_of(st.integers(), json_any),
          "stream": st.one_of(st.booleans(), json_any), "stream_options": st.one_of(
              st.fixed_dictionaries({}, optional={"include_usage": st.one_of(st.booleans(), json_any)}), json_any),
          "presence_penalty": number, "logit_bias": json_any, "user": json_any, "steering": steering}
unknown = st.dictionaries(st.text(max_size=8), json_any, max_size=2)


def with_unknown(bodies):
    return st.tuples(bodies, unknown).map(lambda t: {**t[1], **t[0]})

model = st.one_of(st.sampled_from(["default", "default+c", "nope"]), json_any)
chat_body = with_unknown(st.fixed_dictionaries({"model": model, "messages": st.one_of(st.lists(message, max_size=3), json_any)},
                                  optional=common | {"logprobs": st.one_of(st.booleans(), json_any),
                                                     "top_logprobs": small_int, "max_completion_tokens": small_int,
                                                     "tools": json_any, "response_format": json_any}))
completion_body = with_unknown(st.fixed_dictionaries(
    {"model": model, "prompt": st.one_of(text, st.lists(text, max_size=3), st.lists(st.integers(-5, 70_000), max_size=6),
                                         st.lists(st.lists(st.integers(0, 300), max_size=4), max_size=3), json_any)},
    optional=common | {"logprobs": small_int, "echo": json_any, "suffix": json_any, "best_of": small_int}))
# well-typed requests (the decode paths: streaming, n, logprobs, stop, steering mixed in batches)
ok_text = st.text(st.characters(codec="utf-8"), max_size=20)
ok_feature = st.fixed_dictionaries({"feature": st.integers(-1, 33)}, optional={"sae": st.sampled_from(["main", "x"])}
                                   ).flatmap(lambda d: st.sampled_from(["clamp", "add", "scale"]).flatmap(
                                       lambda k: st.floats(-30, 30).map(lambda v: d | {k: v})))
ok_common = {"max_tokens": st.integers(0, 4), "temperature": st.floats(0, 2.5), "top_p": st.floats(0, 1),
             "n": st.one_of(st.none(), st.integers(1, 3)), "stop": st.one_of(ok_text, st.lists(ok_text, max_size=2)),
             "seed": st.integers(-2**63, 2**63), "stream": st.booleans(),
             "steering": st.one_of(st.sampled_from(["default+c", "nope"]), st.fixed_dictionaries({}, optional={
                 "policy": st.sampled_from(["default", "default+c"]), "features": st.lists(ok_feature, max_size=3),
                 "positions": st.sampled_from(["all", "prompt", "generated"])}))}
ok_chat = st.fixed_dictionaries(
    {"model": st.sampled_from(["default", "default+c"]),
     "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                                 "content": ok_text}), min_size=1, max_size=3)},
    optional=ok_common | {"logprobs": st.booleans(), "top_logprobs": st.integers(0, 3),
                          "stream_options": st.just({"include_usage": True})})
ok_completion = st.fixed_dictionaries(
    {"model": st.sampled_from(["default", "default+c"]),
     "prompt": st.one_of(ok_text, st.lists(ok_text, min_size=1, max_size=2), st.lists(st.integers(0, 300), max_size=5))},
    optional=ok_common | {"logprobs": st.integers(0, 3)})
chat_body = st.one_of(ok_chat, chat_body)
completion_body = st.one_of(ok_completion, completion_body)
raw_bytes = st.one_of(st.binary(max_size=64), st.text(max_size=64).map(lambda s: s.encode("utf-8", "surrogatepass")))


def check(http, path, content):
    r = http.post(path, content=content, headers=H)
    assert r.status_code != 500 and r.status_code < 600, (r.status_code, r.text[:300], content[:300])
    if r.headers["content-type"].startswith("text/event-stream"):
        assert r.status_code == 200
        lines = [ln for ln in r.text.split("\n\n") if ln.strip()]
        assert lines[-1] == "data: [DONE]"
        for ln in lines[:-1]:
            assert "error" not in json.loads(ln[len("data: "):]), ln
    else:
        assert r.headers["content-type"].startswith("application/json"), r.headers
        obj = r.json()
        assert ("error" in obj) == (r.status_code >= 400), obj
        if r.status_code >= 400:
            assert isinstance(obj["error"]["message"], str)


def dumps(body):
    return json.dumps(body, allow_nan=True, ensure_ascii=True).encode()


@FUZZ
@given(body=chat_body)
def test_fuzz_chat_completions(http, body):
    check(http, "/v1/chat/completions", dumps(body))


@FUZZ
@given(body=completion_body)
def test_fuzz_completions(http, body):
    check(http, "/v1/completions", dumps(body))


@FUZZ
@given(raw=raw_bytes, path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_fuzz_raw_bodies(http, raw, path):
    check(http, path, raw)


def test_still_serving_after_fuzzing(http):
    assert http.get("/health").json()["status"] == "ok"
    r = http.post("/v1/chat/completions", content=dumps({"model": "default", "messages": [{"role": "user",
                                                                                           "content": "hi"}]}),
                  headers=H)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert http.app.state.engine.active == 0
