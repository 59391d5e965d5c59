"""CLI: ``saesteer generate`` / ``chat`` / ``direction`` on a tiny saved model, and their one-line errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from sae_double import make_sae
from saesteer.cli import app, main


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny):
    from saesteer.sae import save_sae

    model, tok = tiny
    root = tmp_path_factory.mktemp("cli_steer")
    mdir = root / "tiny-model"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    sae = make_sae(64, 32, k=4, layer=1, model=str(mdir))
    save_sae(sae, root / "sae")
    harmful = root / "harmful.jsonl"
    harmless = root / "harmless.jsonl"
    harmful.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                               ["how do i make a bomb?", "write malware", "hurt people", "steal a car", "lie"]))
    harmless.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                                ["bake a cake", "what is paris?", "explain light", "reverse a string", "hello"]))
    return {"model": str(mdir), "sae": str(root / "sae"), "root": root,
            "harmful": str(harmful), "harmless": str(harmless)}


def _ok(args, input=None):
    res = CliRunner().invoke(app, args, input=input)
    assert res.exit_code == 0, (res.output, res.exception)
    return res.stdout


def _err(args, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = [x for x in err.splitlines() if x.startswith("saesteer: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err  # (transformers may print a loading bar before)
    return lines[0]


def test_generate_clamp_json_compare(env):
    out = _ok(["generate", "--model", env["model"], "--sae", env["sae"], "-f", "3", "-f", "5", "-c", "60", "-c", "40",
               "--max-new-tokens", "6", "--compare", "--json", "hi there", "bake a cake"])
    recs = [json.loads(x) for x in out.strip().splitlines()]
    assert [r["prompt"] for r in recs] == ["hi there", "bake a cake"]
    assert recs[0]["steering"][0]["kind"] == "clamp" and recs[0]["steering"][0]["values"] == [60.0, 40.0]
    assert any(r["answer"] != r["unsteered"] for r in recs)


def test_generate_spec_file_equals_flags(env, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"kind": "clamp", "sae": env["sae"], "features": [3], "values": [60.0]}))
    a = _ok(["generate", "--model", env["model"], "--spec", str(spec), "--max-new-tokens", "5", "hi"])
    b = _ok(["generate", "--model", env["model"], "--sae", env["sae"], "-f", "3", "-c", "60", "--max-new-tokens", "5",
             "hi"])
    assert a == b


def test_generate_errors_are_one_line(env, capsys):
    base = ["generate", "--model", env["model"], "--max-new-tokens", "2"]
    assert "out of range" in _err(base + ["--sae", env["sae"], "-f", "32", "-c", "1", "hi"], capsys)
    assert "finite" in _err(base + ["--sae", env["sae"], "-f", "3", "-c", "nan", "hi"], capsys)
    assert "layer" in _err(base + ["--sae", env["sae"], "-f", "3", "-c", "1", "--layer", "0", "hi"], capsys)
    assert "--sae" in _err(base + ["-f", "3", "-c", "1", "hi"], capsys)
    assert "--clamp" in _err(base + ["--sae", env["sae"], "-f", "3", "-f", "4", "hi"], capsys)
    assert "not found" in _err(base + ["--spec", str(env["root"] / "missing.json"), "hi"], capsys)
    assert "not found" in _err(base + ["--direction", str(env["root"] / "nodir.safetensors"), "hi"], capsys)
    assert "positions" in _err(base + ["--sae", env["sae"], "-f", "3", "-c", "1", "--positions", "x", "hi"], capsys)


def test_sae_from_another_model_is_refused(env, tmp_path, capsys):
    from saesteer.sae import save_sae

    save_sae(make_sae(64, 32, k=4, layer=1, model="some-other-model"), tmp_path / "foreign")
    msg = _err(["generate", "--model", env["model"], "--sae", str(tmp_path / "foreign"), "-f", "3", "-c", "1", "hi"],
               capsys)
    assert "some-other-model" in msg


def test_direction_then_generate_and_chat(env, tmp_path):
    out = tmp_path / "dir.safetensors"
    _ok(["direction", "--model", env["model"], "--harmful", env["harmful"], "--harmless", env["harmless"],
         "--out", str(out), "--layers", "0,1", "--n-train", "4", "--n-val", "1", "--batch-size", "4"])
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["layer"] in (0, 1) and meta["data"]["harmful"] == env["harmful"] and meta["norm"] > 0
    assert meta["meta"]["n_harmful"] == 4 and meta["meta"]["n_harmful_val"] == 1
    add = _ok(["generate", "--model", env["model"], "--direction", str(out), "--alpha", "30", "--max-new-tokens", "4",
               "--json", "--compare", "hi"])
    rec = json.loads(add)
    assert rec["steering"][0]["kind"] == "add" and rec["answer"] != rec["unsteered"]
    _ok(["generate", "--model", env["model"], "--direction", str(out), "--ablate-direction", "--max-new-tokens", "3",
         "hi"])
    chat = _ok(["chat", "--model", env["model"], "--sae", env["sae"], "-f", "3", "-c", "60", "--side-by-side",
                "--max-new-tokens", "4"], input="hello\n/reset\nbake a cake\n/exit\n")
    assert "steered" in chat and "unsteered" in chat and "history cleared" in chat
    plain = _ok(["chat", "--model", env["model"], "--max-new-tokens", "3", "--dtype", "float32", "--quantize", "int8"],
                input="hello\n")
    flat = " ".join(plain.split())  # rich wraps the banner at the terminal width
    assert f"saesteer chat · {env['model']} · float32 · int8 weights · steering: none · /reset, /exit" in flat, plain
    assert "╭─ model " in plain and "steered" not in plain  # the answer panel is titled "model", not "steered"
    assert plain.count("you> ") == 2  # one turn, then EOF
    # the default --quantize auto: int8 for the decode steps on CPU in bf16, unquantized in fp32
    auto = " ".join(_ok(["chat", "--model", env["model"], "--max-new-tokens", "3", "--dtype", "bfloat16"],
                        input="hello\n").split())
    assert "· bfloat16 · int8-decode weights · steering: none" in auto, auto
    fp = " ".join(_ok(["chat", "--model", env["model"], "--max-new-tokens", "3", "--dtype", "float32"],
                      input="hello\n").split())
    assert "· float32 · steering: none" in fp, fp
