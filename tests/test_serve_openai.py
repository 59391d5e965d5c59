"""Issue 18 §2-3: the defects found in the server, the OpenAI surface clients rely on, security (in-process ASGI)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from saesteer.generation import generate
from saesteer.serve import RedactQuery, ServeConfig, check_bind, key_matches, make_app, served_models
from saesteer.steering import Add, steer

openai = pytest.importorskip("openai")
from fastapi.testclient import TestClient  # noqa: E402

KEY = "sk-test-key"
H = {"Authorization": f"Bearer {KEY}"}
MSGS = [{"role": "user", "content": "how do i make a cake?"}]


@pytest.fixture(scope="module")
def lm():
    from saesteer.models import tiny_model

    model, tok = tiny_model("llama", weight_std=0.15)  # varied greedy outputs
    return model, tok


@pytest.fixture(scope="module")
def app(lm):
    model, tok = lm
    vec = torch.randn(64, generator=torch.Generator().manual_seed(2)) * 3
    served = served_models(model, extra={"default+steer": lambda m: steer(m, [Add(vector=vec, layer=0)])})
    a = make_app(model, tok, served, ServeConfig(api_key=KEY, max_tokens_limit=40, batch_wait_ms=5))
    yield a
    a.state.engine.close()


@pytest.fixture(scope="module")
def http(app):
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def client(http):
    return openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=http, max_retries=0)


def _err(r, status, code=None):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    e = r.json()["error"]
    assert set(e) >= {"message", "type", "code"} and isinstance(e["message"], str)
    if code is not None:
        assert e["code"] == code
    return e


# ------------------------------------------------------------------------------------------- defects
def test_lone_surrogate_is_a_json_4xx_not_a_plain_500(http):
    raw = '{"model": "default", "messages": [{"role": "user", "content": "hi \\ud800 there"}], "max_tokens": 2}'
    e = _err(http.post("/v1/chat/completions", content=raw, headers=H | {"content-type": "application/json"}), 400)
    assert "surrogate" in e["message"]
    raw = '{"model": "default", "prompt": "\\udfff", "max_tokens": 2}'
    _err(http.post("/v1/completions", content=raw, headers=H), 400)
    h = http.get("/health").json()
    assert h["status"] == "ok" and h["weights"] == {"dtype": "float32", "quantize": "none"}


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_wrong_method_is_an_openai_405(http, method):
    e = _err(http.request(method, "/v1/chat/completions", headers=H), 405, "method_not_allowed")
    assert "detail" not in e


def test_unknown_path_is_an_openai_404(http):
    _err(http.get("/v1/nothing-here", headers=H), 404, "not_found")
    _err(http.post("/v1/embeddings", json={}, headers=H), 404, "not_found")


def test_unexpected_exception_is_an_openai_500(http, monkeypatch):
    from saesteer.serve import server as serve

    def boom(*a, **k):
        raise RuntimeError("kaput")

    monkeypatch.setattr(serve, "_usage", boom)
    e = _err(http.post("/v1/chat/completions", json={"model": "default", "messages": MSGS, "max_tokens": 2},
                       headers=H), 500)
    assert e["type"] == "server_error"
    monkeypatch.undo()
    assert http.post("/v1/chat/completions", json={"model": "default", "messages": MSGS, "max_tokens": 2},
                     headers=H).status_code == 200


def test_docs_and_schema_are_off_by_default_and_behind_the_key(lm, http):
    for path in ("/docs", "/redoc", "/openapi.json"):
        _err(http.get(path), 401)
        _err(http.get(path, headers=H), 404)
    model, tok = lm
    a = make_app(model, tok, {"default": None}, ServeConfig(api_key=KEY, docs=True))
    try:
        with TestClient(a) as c:
            for path in ("/docs", "/redoc", "/openapi.json"):
                _err(c.get(path), 401)
                assert c.get(path, headers=H).status_code == 200
            assert c.get("/health").status_code == 200  # the one open path
    finally:
        a.state.engine.close()


def test_key_constant_time_and_scheme_case_insensitive(http, monkeypatch):
    import hmac

    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    for scheme in ("bearer", "BEARER", "Bearer"):
        assert http.get("/v1/models", headers={"Authorization": f"{scheme} {KEY}"}).status_code == 200
    assert calls
    _err(http.get("/v1/models", headers={"Authorization": "Basic " + KEY}), 401, "invalid_api_key")
    _err(http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}x"}), 401)
    _err(http.get(f"/v1/models?api_key={KEY}"), 401)
    assert key_matches(f"  bearer   {KEY} ", KEY) and not key_matches(None, KEY) and not key_matches("Bearer", KEY)


def test_access_log_hides_query_strings():
    from saesteer.serve import server as serve

    rec = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                            ("127.0.0.1:5555", "GET", "/v1/models?api_key=sk-secret-1", "1.1", 401), None)
    assert RedactQuery().filter(rec) and "sk-secret-1" not in rec.getMessage() and "/v1/models" in rec.getMessage()
    serve.install_log_redaction()
    serve.install_log_redaction()
    assert sum(isinstance(f, RedactQuery) for f in logging.getLogger("uvicorn.access").filters) == 1


def test_non_loopback_host_without_key_is_refused(monkeypatch, capsys):
    from saesteer.cli import main
    from saesteer.core import SaesteerError

    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_bind(host, None)
    check_bind("0.0.0.0", "k")
    check_bind("0.0.0.0", None, insecure=True)
    with pytest.raises(SaesteerError, match="--insecure"):
        check_bind("0.0.0.0", None)
    monkeypatch.delenv("SAESTEER_API_KEY", raising=False)
    with pytest.raises(SystemExit) as ei:
        main(["serve", "--host", "0.0.0.0", "--port", "8123"])
    assert ei.value.code == 2 and "saesteer: error: refusing to listen on 0.0.0.0" in capsys.readouterr().err


@pytest.mark.parametrize("extra,status,word", [
    ({"stream": "false"}, 422, "stream"),
    ({"stream": 0}, 422, "stream"),
    ({"max_tokens": "4"}, 422, "max_tokens"),
    ({"temperature": True}, 422, "temperature"),
    ({"n": 0}, 400, "n"),
    ({"n": 99}, 400, "n"),
    ({"presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"frequency_penalty": -1}, 400, "frequency_penalty"),
    ({"logit_bias": {"5": 10}}, 400, "logit_bias"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ({"tool_choice": "required"}, 400, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"top_logprobs": 2}, 400, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ({"logprobs": True, "stream": True}, 400, "logprobs"),
    ({"stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"best_of_luck": 1}, 400, "best_of_luck"),
    ({"seed": 2**70}, 400, "seed"),
    ({"temperature": float("nan")}, 400, "temperature"),
])
def test_strict_types_and_unsupported_parameters(http, extra, status, word):
    body = json.dumps({"model": "default", "messages": MSGS, "max_tokens": 2} | extra)
    e = _err(http.post("/v1/chat/completions", content=body, headers=H), status)
    assert word in e["message"]
    if status == 400 and word in ("presence_penalty", "logit_bias", "tools", "response_format", "best_of_luck"):
        assert e["code"] == "unsupported_parameter" and e["param"] == word


def test_no_op_values_of_unsupported_parameters_and_n_null_are_accepted(http):
    body = {"model": "default", "messages": MSGS, "max_tokens": 2, "n": None, "presence_penalty": 0,
            "frequency_penalty": 0.0, "logit_bias": {}, "tools": [], "response_format": {"type": "text"},
            "user": "u1", "stream": False, "logprobs": False, "temperature": 0}
    r = http.post("/v1/chat/completions", json=body, headers=H)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1 and r.json()["choices"][0]["logprobs"] is None


# ------------------------------------------------------------------------------------------- OpenAI surface
def test_logprobs_are_the_model_distribution(client, lm):
    model, tok = lm
    r = client.chat.completions.create(model="default", messages=MSGS, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3)
    lp = r.choices[0].logprobs.content
    assert len(lp) == r.usage.completion_tokens == 5
    for e in lp:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        assert e.token == e.top_logprobs[0].token and abs(e.logprob - e.top_logprobs[0].logprob) < 1e-6  # greedy
    from saesteer.generation import encode_prompts

    ids = torch.tensor([encode_prompts(tok, [MSGS])[0]])
    with torch.no_grad():
        ref = torch.log_softmax(model(ids).logits[0, -1].float(), -1).max().item()
    assert abs(lp[0].logprob - ref) < 1e-4


def test_stream_usage_and_one_created_per_response(client, app):
    chunks = list(client.chat.completions.create(model="default", messages=MSGS, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert len({c.created for c in chunks}) == 1 and len({c.id for c in chunks}) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    full = client.chat.completions.create(model="default", messages=MSGS, max_tokens=6, temperature=0)
    assert text == full.choices[0].message.content and full.usage.completion_tokens == 6


def test_n_choices_are_rows_of_one_batch(client, app, lm):
    model, tok = lm
    before = app.state.engine.batches_run
    r = client.chat.completions.create(model="default", messages=MSGS, max_tokens=6, temperature=0, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2] and app.state.engine.batches_run - before == 1
    assert app.state.engine.batch_sizes[-1] == 3
    with app.state.engine.model_lock:
        ref = generate(model, tok, [MSGS], max_new_tokens=6)[0]
    assert all(c.message.content == ref for c in r.choices) and r.usage.completion_tokens == 18
    s = client.chat.completions.create(model="default", messages=MSGS, max_tokens=6, temperature=1.0, n=2, seed=5)
    s2 = client.chat.completions.create(model="default", messages=MSGS, max_tokens=6, temperature=1.0, n=2, seed=5)
    assert [c.message.content for c in s.choices] == [c.message.content for c in s2.choices]
    chunks = list(client.chat.completions.create(model="default", messages=MSGS, max_tokens=4, temperature=0, n=2,
                                                 stream=True))
    per = {0: "", 1: ""}
    for c in chunks:
        for ch in c.choices:
            per[ch.index] += ch.delta.content or ""
    assert per[0] == per[1] == generate(model, tok, [MSGS], max_new_tokens=4)[0]


def test_completions_endpoint_raw_prompts(client, app, lm):
    model, tok = lm
    prompt = "The capital of France is"
    r = client.completions.create(model="default", prompt=prompt, max_tokens=6, temperature=0)
    with app.state.engine.model_lock:
        ref = generate(model, tok, [prompt], max_new_tokens=6, raw=True)[0]
    assert r.object == "text_completion" and r.choices[0].text == ref
    ids = tok(prompt)["input_ids"]
    r2 = client.completions.create(model="default", prompt=ids, max_tokens=6, temperature=0)
    assert r2.choices[0].text == ref
    r3 = client.completions.create(model="default", prompt=[prompt, "Once upon a time"], max_tokens=3, temperature=0,
                                   logprobs=2)
    assert len(r3.choices) == 2 and r3.choices[0].text == generate(model, tok, [prompt], max_new_tokens=3, raw=True)[0]
    lp = r3.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3 and len(lp.top_logprobs[0]) <= 2
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.completions.create(model="default", prompt=prompt, max_tokens=1, echo=True, logprobs=1)
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        client.completions.create(model="default", prompt=[10**9], max_tokens=1)
    text = "".join(c.choices[0].text for c in client.completions.create(model="default", prompt=prompt, max_tokens=6,
                                                                        temperature=0, stream=True) if c.choices)
    assert text == ref


def test_deeply_nested_body_is_not_a_500(http):
    for depth in (900, 5000):
        raw = '{"model": "default", "messages": ' + "[" * depth + "]" * depth + "}"
        r = http.post("/v1/chat/completions", content=raw, headers=H)
        assert r.status_code in (400, 422), r.text[:200]
        assert "error" in r.json()
