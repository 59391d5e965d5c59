"""Issue 18 §1: per-request steering (extra_body ``steering``), differently steered requests decoded in one batch."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import threading
import time

import httpx
import pytest

from sae_double import make_sae
from saesteer.generation import generate
from saesteer.models import model_name
from saesteer.serve import ServeConfig, ServedSteering, make_app
from saesteer.steering import Clamp, steer
from serve_live import KEY, Live

openai = pytest.importorskip("openai")
MSGS = [{"role": "user", "content": "how do i make a cake?"}]
FEAT = 3


@pytest.fixture(scope="module")
def lm():
    from saesteer.models import tiny_model

    model, tok = tiny_model("llama", weight_std=0.15)  # varied greedy outputs
    sae = make_sae(64, 32, 4, layer=0, model=model_name(model))
    return model, tok, sae


def clamp(sae, v, feat=FEAT):
    return Clamp(sae=sae, features=[feat], values=[v])


def ref(model, tok, ivs, n=10, msgs=MSGS):
    with contextlib.ExitStack() as st:
        if ivs:
            st.enter_context(steer(model, ivs))
        return generate(model, tok, [msgs], max_new_tokens=n)[0]


@pytest.fixture(scope="module")
def live(lm):
    model, tok, sae = lm
    gate, entered = threading.Event(), threading.Event()

    @contextlib.contextmanager
    def slow(_model):  # an opaque factory that holds the worker until the test lets it go
        entered.set()
        gate.wait(30)
        yield

    served = {"default": None, "default+clamp": ServedSteering([clamp(sae, 12.0, feat=5)]), "slow": slow}
    srv = Live(model, tok, served, ServeConfig(api_key=KEY, max_tokens_limit=40, batch_wait_ms=5,
                                               steer_max_features=2, steer_max_value=50.0), saes={"main": sae})
    srv.gate, srv.entered = gate, entered
    yield srv
    gate.set()
    srv.stop()


def ask(c, steering=None, model="default", n=10):
    kw = {"extra_body": {"steering": steering}} if steering is not None else {}
    return c.chat.completions.create(model=model, messages=MSGS, max_tokens=n, temperature=0, **kw)


def test_mixed_steering_in_one_batch_equals_single_requests(live, lm):
    model, tok, sae = lm
    c = live.client()
    eng = live.app.state.engine
    asks = [  # (model, steering, reference interventions)
        ("default", {"features": [{"sae": "main", "feature": FEAT, "clamp": 25.0}]}, [clamp(sae, 25.0)]),
        ("default", {"features": [{"feature": FEAT, "clamp": -20.0}]}, [clamp(sae, -20.0)]),
        ("default", None, []),
        ("default+clamp", None, [clamp(sae, 12.0, feat=5)]),
    ]
    single = [ask(c, st, m).choices[0].message.content for m, st, _ in asks]  # one at a time
    with eng.model_lock:
        refs = [ref(model, tok, ivs) for _, _, ivs in asks]
    assert single == refs and len(set(refs)) == 4, refs  # the four steerings differ

    live.gate.clear()
    live.entered.clear()
    with cf.ThreadPoolExecutor(5) as ex:
        blocker = ex.submit(lambda: c.chat.completions.create(model="slow", messages=MSGS, max_tokens=2))
        assert live.entered.wait(20)  # the worker is busy in the slow batch: the next requests queue up together
        before = eng.batches_run
        futs = [ex.submit(ask, c, st, m) for m, st, _ in asks]
        t0 = time.time()
        while eng.active < 1 + len(asks):
            assert time.time() - t0 < 20
            time.sleep(0.02)
        live.gate.set()
        outs = [f.result() for f in futs]
        blocker.result()
    assert eng.batches_run - before == 2 and eng.batch_sizes[-1] == len(asks)  # slow batch, then ONE mixed batch
    assert [o.choices[0].message.content for o in outs] == single
    assert outs[0].model_extra["steering"] == {"policy": None, "positions": "all",
                                                "features": [{"sae": "main", "feature": FEAT, "clamp": 25.0}]}
    assert outs[3].model_extra["steering"]["policy"] == "default+clamp"
    assert not getattr(model, "_saesteer_interventions", None)
    assert all(iv.row_scale is None for iv in live.app.state.engine.served["default+clamp"].interventions)


def test_policy_by_name_add_and_scale(live, lm):
    model, tok, sae = lm
    c = live.client()
    a = ask(c, {"policy": "default+clamp"}).choices[0].message.content
    assert a == ask(c, None, model="default+clamp").choices[0].message.content
    assert a == ask(c, "default+clamp").choices[0].message.content  # string shorthand
    from saesteer.steering import Add, Scale

    r = ask(c, {"features": [{"feature": 7, "add": 8.0}, {"feature": FEAT, "scale": 3.0}], "positions": "generated"})
    with live.app.state.engine.model_lock:
        want = ref(model, tok, [Add(sae=sae, feature=7, alpha=8.0, positions="generated"),
                                Scale(sae=sae, features=[FEAT], factor=3.0, positions="generated")])
    assert r.choices[0].message.content == want
    assert r.model_extra["steering"]["features"] == [{"sae": "main", "feature": 7, "add": 8.0},
                                                     {"sae": "main", "feature": FEAT, "scale": 3.0}]
    # stacked on a spec-steered model
    r = ask(c, {"features": [{"feature": FEAT, "clamp": 25.0}]}, model="default+clamp")
    with live.app.state.engine.model_lock:
        assert r.choices[0].message.content == ref(model, tok, [clamp(sae, 12.0, feat=5), clamp(sae, 25.0)])


@pytest.mark.parametrize("steering,model,word", [
    ({"features": [{"sae": "other", "feature": 1, "clamp": 1.0}]}, "default", "not allowed"),
    ({"features": [{"feature": 1, "clamp": 51.0}]}, "default", "clamp"),
    ({"features": [{"feature": 1, "scale": 21.0}]}, "default", "scale"),
    ({"features": [{"feature": 1, "add": float("inf")}]}, "default", "add"),
    ({"features": [{"feature": 1, "clamp": 1.0}] * 3}, "default", "too many"),
    ({"features": [{"feature": 999, "clamp": 1.0}]}, "default", "out of range"),
    ({"features": [{"feature": 1}]}, "default", "exactly one"),
    ({"features": [{"feature": 1, "clamp": 1.0, "add": 2.0}]}, "default", "exactly one"),
    ({"features": [{"feature": 1, "clamp": 1.0}], "positions": "middle"}, "default", "positions"),
    ({"policy": "nope"}, "default", "unknown steering policy"),
    ({"policy": "default+clamp"}, "slow", "steered already"),
    ({"features": [{"feature": 1, "clamp": 1.0}]}, "slow", "policy"),
])
def test_disallowed_steering_is_a_400(live, steering, model, word):
    r = httpx.post(live.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   content=__import__("json").dumps({"model": model, "messages": MSGS, "max_tokens": 2,
                                                     "steering": steering}))
    assert r.status_code == 400, r.text
    assert word in r.json()["error"]["message"]


def test_steering_types_are_strict_and_off_without_saes(lm):
    from fastapi.testclient import TestClient

    model, tok, _ = lm
    app = make_app(model, tok, {"default": None}, ServeConfig())
    try:
        with TestClient(app) as c:
            body = {"model": "default", "messages": MSGS, "max_tokens": 2}
            r = c.post("/v1/chat/completions", json=body | {"steering": {"features": [{"feature": 1, "clamp": 1}]}})
            assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_parameter"
            r = c.post("/v1/chat/completions", json=body | {"steering": {"features": [{"feature": "1", "clamp": 1}]}})
            assert r.status_code == 422
            r = c.post("/v1/chat/completions", json=body | {"steering": {"wat": 1}})
            assert r.status_code == 422
            assert c.get("/v1/steering").json()["saes"] == {}
    finally:
        app.state.engine.close()


def test_steering_limits_endpoint(live):
    info = httpx.get(live.url + "/v1/steering", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert info["saes"] == {"main": {"layer": 0, "num_latents": 32}} and info["max_features"] == 2
    assert "default+clamp" in info["policies"]


def test_cli_allow_sae_must_exist(monkeypatch, capsys):
    from saesteer.cli import main

    monkeypatch.delenv("SAESTEER_API_KEY", raising=False)
    with pytest.raises(SystemExit) as ei:
        main(["serve", "--allow-sae", "x=/nonexistent/sae", "--port", "8123"])
    assert ei.value.code == 2 and "SAE folder not found" in capsys.readouterr().err
