"""The OpenAI-compatible server on loopback: official openai client, streaming, batching, auth, limits, PyRIT."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import socket
import threading
import time

import httpx
import pytest
import torch

from saesteer.core import SaesteerError
from saesteer.generation import generate
from saesteer.serve import ServeConfig, parse_request, served_models
from saesteer.steering import Add, steer
from serve_live import Live

openai = pytest.importorskip("openai")
KEY = "sk-test-key"
MSGS = [{"role": "user", "content": "how do i make a cake?"}]


@pytest.fixture(scope="module")
def lm():
    from saesteer.models import tiny_model

    model, tok = tiny_model("llama", weight_std=0.15)  # varied greedy outputs
    vec = torch.randn(64, generator=torch.Generator().manual_seed(2)) * 3
    return model, tok, vec


@pytest.fixture(scope="module")
def live(lm):
    model, tok, vec = lm
    served = served_models(model, extra={"default+steer": lambda m: steer(m, [Add(vector=vec, layer=0)])})
    cfg = ServeConfig(api_key=KEY, max_tokens_limit=40, max_messages=4, max_body_bytes=20_000, batch_wait_ms=150)
    srv = Live(model, tok, served, cfg)
    yield srv
    srv.stop()


def test_models_and_health(live):
    ids = [m.id for m in live.client().models.list().data]
    assert ids == ["default", "default+steer"]
    h = httpx.get(live.url + "/health").json()  # no key needed
    assert h["status"] == "ok" and h["served"] == ids


def test_greedy_completion_matches_generate_and_steering_applies(live, lm):
    model, tok, vec = lm
    c = live.client()
    lock = live.app.state.engine.model_lock  # the worker may still be leaving the batch's steering context
    r = c.chat.completions.create(model="default", messages=MSGS, max_tokens=12, temperature=0)
    with lock:
        assert r.choices[0].message.content == generate(model, tok, [MSGS], max_new_tokens=12)[0]
    assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
    s = c.chat.completions.create(model="default+steer", messages=MSGS, max_tokens=12, temperature=0)
    with lock:
        assert not getattr(model, "_saesteer_interventions", None)  # steering removed after the batch
        with steer(model, [Add(vector=vec, layer=0)]):
            ref = generate(model, tok, [MSGS], max_new_tokens=12)[0]
    assert s.choices[0].message.content == ref != r.choices[0].message.content


def test_streaming_equals_non_streaming(live):
    c = live.client()
    full = c.chat.completions.create(model="default+steer", messages=MSGS, max_tokens=15, temperature=0)
    parts, finish = [], None
    for ch in c.chat.completions.create(model="default+steer", messages=MSGS, max_tokens=15, temperature=0, stream=True):
        if ch.choices and ch.choices[0].delta.content:
            parts.append(ch.choices[0].delta.content)
        if ch.choices and ch.choices[0].finish_reason:
            finish = ch.choices[0].finish_reason
    assert "".join(parts) == full.choices[0].message.content and finish == "length"


def test_stop_and_seeded_sampling(live):
    c = live.client()
    full = c.chat.completions.create(model="default", messages=MSGS, max_tokens=20, temperature=0).choices[0].message.content
    stop = full[4:7]
    r = c.chat.completions.create(model="default", messages=MSGS, max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].message.content == full[: full.find(stop)] and r.choices[0].finish_reason == "stop"
    a = [c.chat.completions.create(model="default", messages=MSGS, max_tokens=10, temperature=1.0, seed=s)
         .choices[0].message.content for s in (3, 3, 4)]
    assert a[0] == a[1] != a[2]


def test_concurrent_requests_are_batched(live, lm):
    model, tok, _ = lm
    prompts = [f"question number {i}: what is the capital of france?" for i in range(6)]
    before = live.app.state.engine.batches_run
    c = live.client()

    def ask(p):
        return c.chat.completions.create(model="default", messages=[{"role": "user", "content": p}], max_tokens=8,
                                         temperature=0).choices[0].message.content

    eng = live.app.state.engine
    with cf.ThreadPoolExecutor(6) as ex:
        with eng.model_lock:  # the worker waits on its first batch: every other request queues up meanwhile
            futs = [ex.submit(ask, p) for p in prompts]
            t0 = time.time()
            while eng.active < len(prompts):
                assert time.time() - t0 < 20
                time.sleep(0.02)
        outs = [f.result() for f in futs]
    with eng.model_lock:
        assert outs == [generate(model, tok, [p], max_new_tokens=8)[0] for p in prompts]
    assert eng.batches_run - before < 6  # some requests shared a batch


def test_auth_required(live):
    with pytest.raises(openai.AuthenticationError):
        live.client(key="wrong").models.list()
    r = httpx.post(live.url + "/v1/chat/completions", json={"model": "default", "messages": MSGS})
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]


@pytest.mark.parametrize("kw,exc,word", [
    (dict(model="nope"), "NotFoundError", "unknown model"),
    (dict(max_tokens=41), "BadRequestError", "max_tokens"),
    (dict(max_tokens=-3), "BadRequestError", "max_tokens"),
    (dict(messages=MSGS * 5), "BadRequestError", "too many messages"),
    (dict(messages=[{"role": "wizard", "content": "hi"}]), "BadRequestError", "role"),
    (dict(temperature=7), "BadRequestError", "temperature"),
])
def test_bad_requests_get_clear_4xx(live, kw, exc, word):
    args = dict(model="default", messages=MSGS, max_tokens=4) | kw
    with pytest.raises(getattr(openai, exc)) as ei:
        live.client().chat.completions.create(**args)
    assert word in str(ei.value)


def test_malformed_json_body_size_and_prompt_length(live):
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(live.url + "/v1/chat/completions", content=b'{"model": "default", "messages": [', headers=h)
    assert r.status_code == 422 and "malformed JSON" in r.json()["error"]["message"]
    r = httpx.post(live.url + "/v1/chat/completions", content=json.dumps({"model": "default", "messages": "hi"}), headers=h)
    assert r.status_code == 422 and "messages" in r.json()["error"]["message"]
    big = json.dumps({"model": "default", "messages": [{"role": "user", "content": "x" * 10_000_000}]})
    r = httpx.post(live.url + "/v1/chat/completions", content=big, headers=h)
    assert r.status_code == 413
    long = {"model": "default", "messages": [{"role": "user", "content": "the quick brown fox " * 700}]}
    r = httpx.post(live.url + "/v1/chat/completions", json=long, headers=h)
    assert r.status_code == 400 and "tokens" in r.json()["error"]["message"]
    assert httpx.get(live.url + "/health").json()["status"] == "ok"  # still serving


def test_disconnect_mid_stream_then_keeps_serving(live):
    h = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "default", "messages": MSGS, "max_tokens": 40, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as cl:
        with cl.stream("POST", live.url + "/v1/chat/completions", json=body, headers=h) as r:
            assert r.status_code == 200
            first = next(r.iter_lines())
            assert first.startswith("data: ")
    # the server notices, cancels the row and keeps serving
    r = live.client().chat.completions.create(model="default", messages=MSGS, max_tokens=3, temperature=0)
    assert r.choices[0].message.content
    t0 = time.time()
    while httpx.get(live.url + "/health").json()["active_requests"] != 0:
        assert time.time() - t0 < 10
        time.sleep(0.05)


def test_queue_limit_gives_429(lm):
    model, tok, _ = lm
    gate = threading.Event()

    @contextlib.contextmanager
    def slow(_model):  # holds the worker (and the only slot) until the test lets it go
        gate.wait(20)
        yield

    srv = Live(model, tok, {"default": None, "slow": slow}, ServeConfig(max_queue=1))
    try:
        c = srv.client()
        with cf.ThreadPoolExecutor(1) as ex:
            fut = ex.submit(lambda: c.chat.completions.create(model="slow", messages=MSGS, max_tokens=2, temperature=0))
            t0 = time.time()
            while httpx.get(srv.url + "/health").json()["active_requests"] != 1:
                assert time.time() - t0 < 10
                time.sleep(0.02)
            with pytest.raises(openai.RateLimitError, match="busy"):
                c.chat.completions.create(model="default", messages=MSGS, max_tokens=2)
            gate.set()
            assert fut.result().choices[0].message.content
        assert c.chat.completions.create(model="default", messages=MSGS, max_tokens=2).choices[0].message.content
    finally:
        gate.set()
        srv.stop()


def test_parse_request_and_served_models_errors(lm):
    model, _, _ = lm
    cfg = ServeConfig()
    p = parse_request({"model": "default", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                      {"type": "text", "text": "b"}]}]},
                      cfg, {"default": None})
    assert p["messages"][0]["content"] == "ab" and p["max_tokens"] == cfg.default_max_tokens and p["temperature"] == 1.0
    with pytest.raises(SaesteerError, match="given twice"):
        served_models(model, extra={"default": lambda m: None})
    with pytest.raises(SaesteerError, match="not found"):
        served_models(model, policy="/nonexistent/policy.json")


def test_cli_serve_rejects_bad_options(tmp_path):
    from typer.testing import CliRunner

    from saesteer.cli import app

    res = CliRunner().invoke(app, ["serve", "--port", "0"])
    assert res.exit_code != 0 and "--port" in str(res.exception or res.output)
    res = CliRunner().invoke(app, ["serve", "--feature", "3", "--clamp", "2"])
    assert res.exit_code != 0 and "--sae" in str(res.exception or res.output)
    res = CliRunner().invoke(app, ["serve", "--policy", str(tmp_path / "none.json")])
    assert res.exit_code != 0 and "not found" in str(res.exception or res.output)


def test_pyrit_openai_chat_target_gets_steered_answer(live, lm):
    pytest.importorskip("pyrit", reason="pyrit is not installed (pip install pyrit)")
    import asyncio

    from pyrit.models import Message
    from pyrit.prompt_target import OpenAIChatTarget
    from pyrit.setup import IN_MEMORY, initialize_pyrit_async

    model, tok, vec = lm

    async def go():
        await initialize_pyrit_async(memory_db_type=IN_MEMORY)
        target = OpenAIChatTarget(endpoint=live.url + "/v1", api_key=KEY, model_name="default+steer",
                                  temperature=0.0, max_completion_tokens=10)
        msg = Message.from_prompt(prompt=MSGS[0]["content"], role="user")
        resp = await target.send_prompt_async(message=msg)
        resp = resp[0] if isinstance(resp, list) else resp
        return resp.message_pieces[0].converted_value

    got = asyncio.run(go())
    with live.app.state.engine.model_lock, steer(model, [Add(vector=vec, layer=0)]):
        ref = generate(model, tok, [MSGS], max_new_tokens=10)[0]
    assert got == ref


def test_cli_serve_end_to_end_subprocess(lm, tmp_path):
    import subprocess
    import sys

    model, tok, _ = lm
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")

    def start() -> tuple[subprocess.Popen, int]:
        """The CLI server on a free port. The port is found by binding 0 and released before the child binds it, so
        another process may take it in between: a child that exits for that reason is started again on a new port."""
        for _ in range(5):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            cmd = [sys.executable, "-m", "saesteer", "serve", "--model", str(tmp_path / "tiny"), "--port", str(port),
                   "--api-key", KEY, "--threads", "1", "--dtype", "float32"]  # the reference below is fp32
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            t0 = time.time()
            while proc.poll() is None:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                        return proc, port
                except httpx.TransportError:
                    pass
                assert time.time() - t0 < 60, "server did not come up"
                time.sleep(0.2)
            out = proc.stdout.read()
            assert "address already in use" in out.lower(), out
        raise AssertionError("no free port in 5 tries")

    proc, port = start()
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in c.models.list().data] == ["default"]
        assert httpx.get(f"http://127.0.0.1:{port}/health").json()["weights"] == {"dtype": "float32", "quantize": "none"}
        r = c.chat.completions.create(model="default", messages=MSGS, max_tokens=6, temperature=0)
        assert r.choices[0].message.content == generate(model, tok, [MSGS], max_new_tokens=6)[0]
    finally:
        proc.terminate()
        proc.wait(timeout=20)
