"""Issue 18 §2: lm-eval-harness's ``local-chat-completions`` / ``local-completions`` models and PyRIT's
``OpenAIChatTarget`` against the server, end to end on the small real model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import json

import pytest
import torch

from saesteer.generation import generate
from saesteer.models import d_model
from saesteer.serve import ServeConfig, ServedSteering, served_models
from saesteer.steering import Add, steer
from serve_live import KEY, Live

pytestmark = pytest.mark.integration
openai = pytest.importorskip("openai")
MSGS = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def small(smollm):
    model, tok = smollm
    v = torch.randn(d_model(model), generator=torch.Generator().manual_seed(0))
    iv = Add(vector=v / v.norm() * 60.0, layer=10)  # strong enough to change the answer
    served = served_models(model)
    served["default+steer"] = ServedSteering([iv])
    srv = Live(model, tok, served, ServeConfig(api_key=KEY, max_tokens_limit=32, batch_wait_ms=10))
    yield srv, model, tok, iv
    srv.stop()


def _ref(srv, model, tok, prompts, ivs=(), **kw):
    with srv.app.state.engine.model_lock:
        if ivs:
            with steer(model, list(ivs)):
                return generate(model, tok, prompts, **kw)
        return generate(model, tok, prompts, **kw)


def test_lm_eval_local_chat_completions(small, monkeypatch):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.api_models import JsonChatStr
    from lm_eval.models.openai_completions import LocalChatCompletion

    srv, model, tok, iv = small
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    prompts = [MSGS, [{"role": "user", "content": "Name a colour."}]]
    for name, ivs in (("default", []), ("default+steer", [iv])):
        lm = LocalChatCompletion(base_url=srv.url + "/v1/chat/completions", model=name, num_concurrent=2,
                                 max_retries=1, tokenizer_backend=None, tokenized_requests=False)
        inst = [Instance("generate_until", {}, (JsonChatStr(json.dumps(p)), {"until": ["\n\n"], "max_gen_toks": 12,
                                                                              "do_sample": False}), i)
                for i, p in enumerate(prompts)]
        got = lm.generate_until(inst)
        assert got == _ref(srv, model, tok, prompts, ivs, max_new_tokens=12, stop=["\n\n"]), name


def test_lm_eval_local_completions(small, monkeypatch):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    srv, model, tok, _ = small
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    lm = LocalCompletionsAPI(base_url=srv.url + "/v1/completions", model="default", max_retries=1,
                             tokenizer_backend=None, tokenized_requests=False)
    prompts = ["Question: What is 2 + 2?\nAnswer:", "The capital of France is"]
    inst = [Instance("generate_until", {}, (p, {"until": ["\n"], "max_gen_toks": 10, "do_sample": False}), i)
            for i, p in enumerate(prompts)]
    assert lm.generate_until(inst) == _ref(srv, model, tok, prompts, raw=True, max_new_tokens=10, stop=["\n"])


def test_pyrit_openai_chat_target_on_the_small_model(small):
    pytest.importorskip("pyrit")
    import asyncio

    from pyrit.models import Message
    from pyrit.prompt_target import OpenAIChatTarget
    from pyrit.setup import IN_MEMORY, initialize_pyrit_async

    srv, model, tok, iv = small

    async def go(name):
        await initialize_pyrit_async(memory_db_type=IN_MEMORY)
        target = OpenAIChatTarget(endpoint=srv.url + "/v1", api_key=KEY, model_name=name, temperature=0.0,
                                  max_completion_tokens=12)
        resp = await target.send_prompt_async(message=Message.from_prompt(prompt=MSGS[0]["content"], role="user"))
        resp = resp[0] if isinstance(resp, list) else resp
        return resp.message_pieces[0].converted_value

    plain, steered = asyncio.run(go("default")), asyncio.run(go("default+steer"))
    assert plain == _ref(srv, model, tok, [MSGS], max_new_tokens=12)[0]
    assert steered == _ref(srv, model, tok, [MSGS], [iv], max_new_tokens=12)[0] != plain
