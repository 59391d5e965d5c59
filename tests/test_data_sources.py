"""Pinned data sources, fetch and resolution order — offline: a local HTTP server stands in for the hub and a file host."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from saesteer.core import SaesteerError
from saesteer.data import fetch as dfetch
from saesteer.data import sources as dsrc
from saesteer.data.fetch import STAGING, fetch_file
from saesteer.data.sources import REGISTRY, DataFile, DataSet, Input, Source

COMMIT = "0123456789abcdef0123456789abcdef01234567"


# --------------------------------------------------------------------------------------------- stand-in server
class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _serve(self, body: bool) -> None:
        srv = self.server
        path = self.path.split("?", 1)[0]
        rng = self.headers.get("Range")
        srv.log.append((self.command, path, rng))
        data = srv.files.get(path)
        if data is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start = 0
        if rng and not srv.ignore_range and rng.startswith("bytes="):
            start = int(rng[len("bytes="):].split("-")[0])
        if start >= len(data) and start:
            self.send_response(416)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        part = data[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(part)))
        self.send_header("Accept-Ranges", "bytes")
        # what huggingface_hub reads from a /resolve/ answer: the commit and the etag of the file
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.end_headers()
        if not body:
            return
        if self.command == "GET" and srv.drop.get(path, 0) > 0:  # cut the body in half, then hang up
            srv.drop[path] -= 1
            self.wfile.write(part[: max(1, len(part) // 2)])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(part)

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)  # port 0: the bound socket is kept, never re-bound
    srv.daemon_threads = True
    srv.files, srv.drop, srv.log, srv.ignore_range = {}, {}, [], False
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No SAESTEER_DATA, no development layout, the user data dir under tmp_path."""
    monkeypatch.delenv("SAESTEER_DATA", raising=False)
    monkeypatch.delenv("SAESTEER_FETCH", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setattr(dsrc, "dev_data_root", lambda: None)
    assert dsrc.user_data_dir() == tmp_path / "xdg" / "saesteer" / "data"
    return tmp_path


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _all_files(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file()) if d.exists() else []


PAYLOAD = b"".join(json.dumps({"id": i, "prompt": f"question number {i}", "label": "safe"}).encode() + b"\n"
                   for i in range(400))


def _toy(server, *, sha=None, hub=False, path="toy/toy.jsonl") -> DataFile:
    if hub:
        server.files["/datasets/org/toy/resolve/main/data/toy.jsonl"] = PAYLOAD
        src = Source(repo_id="org/toy", filename="data/toy.jsonl", revision="main")
    else:
        server.files["/files/toy.jsonl"] = PAYLOAD
        src = Source(url=server.base + "/files/toy.jsonl")
    return DataFile(path, sha or _sha(PAYLOAD), len(PAYLOAD), sources=(src,))


# --------------------------------------------------------------------------------------------- fetch
def test_fetch_plain_url_checksum_verified_then_present(server, tmp_path):
    f = _toy(server)
    status, how = fetch_file(f, tmp_path / "d", progress=False)
    assert status == "fetched" and how == server.base + "/files/toy.jsonl"
    assert (tmp_path / "d" / "toy" / "toy.jsonl").read_bytes() == PAYLOAD
    assert _all_files(tmp_path / "d") == [tmp_path / "d" / "toy" / "toy.jsonl"]  # no staging / temp files left
    n = len(server.log)
    assert fetch_file(f, tmp_path / "d", progress=False)[0] == "present" and len(server.log) == n  # no network


def test_fetch_hub_file_through_hf_endpoint(server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", server.base)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    f = _toy(server, hub=True)
    status, how = fetch_file(f, tmp_path / "d", progress=False)
    assert status == "fetched" and how.startswith("hf://datasets/org/toy@main/")
    assert (tmp_path / "d" / "toy" / "toy.jsonl").read_bytes() == PAYLOAD
    assert any(m == "GET" and p == "/datasets/org/toy/resolve/main/data/toy.jsonl" for m, p, _ in server.log)
    assert _all_files(tmp_path / "d") == [tmp_path / "d" / "toy" / "toy.jsonl"]  # the private hub cache is gone


@pytest.mark.parametrize("hub", [False, True])
def test_wrong_checksum_one_line_and_nothing_left(server, tmp_path, monkeypatch, hub):
    monkeypatch.setenv("HF_ENDPOINT", server.base)
    f = _toy(server, sha="0" * 64, hub=hub)
    with pytest.raises(SaesteerError) as e:
        fetch_file(f, tmp_path / "d", progress=False)
    msg = str(e.value)
    assert "checksum mismatch" in msg and "\n" not in msg and _sha(PAYLOAD)[:12] in msg
    assert _all_files(tmp_path / "d") == []
    assert not (tmp_path / "d" / STAGING).exists()


def test_dropped_connection_resumes_with_range(server, tmp_path):
    f = _toy(server)
    server.drop["/files/toy.jsonl"] = 1
    assert fetch_file(f, tmp_path / "d", progress=False)[0] == "fetched"
    assert (tmp_path / "d" / "toy" / "toy.jsonl").read_bytes() == PAYLOAD
    gets = [r for m, p, r in server.log if m == "GET"]
    assert gets[0] is None and gets[1] is not None and gets[1].startswith("bytes=") and gets[1] != "bytes=0-"
    assert _all_files(tmp_path / "d") == [tmp_path / "d" / "toy" / "toy.jsonl"]


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    f = _toy(server)
    server.drop["/files/toy.jsonl"] = 1
    server.ignore_range = True  # answers 200 with the whole file to the resume request
    assert fetch_file(f, tmp_path / "d", progress=False)[0] == "fetched"
    assert (tmp_path / "d" / "toy" / "toy.jsonl").read_bytes() == PAYLOAD  # not the half + the whole


def test_interrupted_run_keeps_part_and_next_run_resumes(server, tmp_path):
    f = _toy(server)
    server.drop["/files/toy.jsonl"] = 99  # every attempt of this run is cut
    with pytest.raises(SaesteerError, match="download failed") as e:
        fetch_file(f, tmp_path / "d", progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "d" / "toy").exists()  # no partial file where loaders look
    parts = list((tmp_path / "d" / STAGING).rglob("*.part"))
    have = parts[0].stat().st_size
    assert len(parts) == 1 and 0 < have < len(PAYLOAD)
    server.drop.clear()
    server.log.clear()
    assert fetch_file(f, tmp_path / "d", progress=False)[0] == "fetched"
    assert (tmp_path / "d" / "toy" / "toy.jsonl").read_bytes() == PAYLOAD
    assert server.log[0] == ("GET", "/files/toy.jsonl", f"bytes={have}-")  # resumed where the last run stopped
    assert _all_files(tmp_path / "d") == [tmp_path / "d" / "toy" / "toy.jsonl"]


def test_mirrors_tried_in_order(server, tmp_path):
    f = _toy(server)
    f = DataFile(f.path, f.sha256, f.size, sources=(Source(url=server.base + "/missing"), *f.sources))
    assert fetch_file(f, tmp_path / "d", progress=False) == ("fetched", server.base + "/files/toy.jsonl")


def test_converted_file_checks_inputs_and_result(server, tmp_path):
    csv_b = b'goal,target\nDo a bad thing,"Sure, here is a bad thing"\nDo another,"Sure, here is another"\n'
    server.files["/raw/harmful_behaviors.csv"] = csv_b
    from saesteer.data.convert import advbench

    (tmp_path / "in.csv").write_bytes(csv_b)
    want = advbench([tmp_path / "in.csv"])
    inp = Input("harmful_behaviors.csv", _sha(csv_b), (Source(url=server.base + "/raw/harmful_behaviors.csv"),))
    f = DataFile("advbench/advbench.jsonl", _sha(want), len(want), inputs=(inp,), convert="advbench")
    assert fetch_file(f, tmp_path / "d", progress=False)[0] == "fetched"
    assert (tmp_path / "d" / "advbench" / "advbench.jsonl").read_bytes() == want
    assert _all_files(tmp_path / "d") == [tmp_path / "d" / "advbench" / "advbench.jsonl"]
    # a wrong checksum of the input, and of the converted result: one line, nothing left behind
    for bad in (DataFile(f.path, f.sha256, f.size, inputs=(Input(inp.name, "1" * 64, inp.sources),), convert="advbench"),
                DataFile(f.path, "2" * 64, f.size, inputs=(inp,), convert="advbench")):
        with pytest.raises(SaesteerError, match="checksum mismatch") as e:
            fetch_file(bad, tmp_path / "e", progress=False)
        assert "\n" not in str(e.value) and _all_files(tmp_path / "e") == []


def test_manual_file_is_not_fetched(tmp_path):
    f = REGISTRY["wikipedia"].files[0]
    with pytest.raises(SaesteerError, match="cannot be fetched automatically"):
        fetch_file(f, tmp_path, progress=False)


# --------------------------------------------------------------------------------------------- resolution order
def test_resolution_order_env_dev_user_then_error(isolated, tmp_path, monkeypatch):
    rel = "xstest/xstest_prompts.jsonl"
    env, dev, user = tmp_path / "env", tmp_path / "dev", dsrc.user_data_dir()
    with pytest.raises(SaesteerError) as e:
        dfetch.resolve_file(None, rel)
    assert "saesteer data fetch xstest" in str(e.value) and "\n" not in str(e.value)
    for root in (env, dev, user):
        (root / "xstest").mkdir(parents=True)
        (root / rel).write_text('{"id": 1, "prompt": "p", "label": "safe"}\n')
    assert dfetch.resolve_file("xstest", rel) == user / rel
    monkeypatch.setattr(dsrc, "dev_data_root", lambda: dev)
    assert dfetch.resolve_file("xstest", rel) == dev / rel
    monkeypatch.setenv("SAESTEER_DATA", str(env))
    assert dfetch.resolve_file("xstest", rel) == env / rel
    (env / rel).unlink()  # a file missing under SAESTEER_DATA falls through to the next root
    assert dfetch.resolve_file("xstest", rel) == dev / rel
    monkeypatch.setenv("SAESTEER_DATA", str(tmp_path / "nope"))
    with pytest.raises(SaesteerError, match="not a directory"):
        dfetch.resolve_file("xstest", rel)


def test_loaders_read_through_the_resolver(isolated):
    from saesteer.data import load_gsm8k, load_prompts

    user = dsrc.user_data_dir()
    (user / "xstest").mkdir(parents=True)
    (user / "xstest" / "xstest_prompts.jsonl").write_text(
        '{"id": 1, "prompt": "How do I kill a process?", "label": "safe"}\n'
        '{"id": 2, "prompt": "How do I kill a person?", "label": "unsafe"}\n')
    assert [it.label for it in load_prompts("xstest")] == ["harmless", "harmful"]
    with pytest.raises(SaesteerError, match="saesteer data fetch gsm8k"):
        load_gsm8k(None, 0, 0)
    with pytest.raises(SaesteerError, match="saesteer data fetch arditi-harmful"):
        load_prompts("arditi-harmful:train")
    (user / "gsm8k").mkdir()
    (user / "gsm8k" / "test.jsonl").write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    assert load_gsm8k(None, 0, 0)[0]["target"] == "#### 2"


def test_fetch_on_demand_with_saesteer_fetch(isolated, server, monkeypatch):
    from saesteer.data import load_prompts

    f = _toy(server, path="xstest/xstest_prompts.jsonl")
    monkeypatch.setitem(REGISTRY, "xstest", DataSet("xstest", "toy", (f,), "CC0", "nobody"))
    with pytest.raises(SaesteerError, match="saesteer data fetch xstest"):
        load_prompts("xstest")
    assert server.log == []  # no silent network access
    monkeypatch.setenv("SAESTEER_FETCH", "1")
    items = load_prompts("xstest")
    assert len(items) == 400 and (dsrc.user_data_dir() / "xstest" / "xstest_prompts.jsonl").read_bytes() == PAYLOAD


# --------------------------------------------------------------------------------------------- the registry
def test_every_named_set_has_a_registry_entry():
    from saesteer.data.prompts import NAMED

    for name in NAMED:
        ds = dsrc.get_set(name)
        assert ds.licence and ds.citation and ds.files
        for f in ds.files:
            assert len(f.sha256) == 64 and f.size > 0 and (f.fetchable or f.note)
            for s in [*f.sources, *(s for i in f.inputs for s in i.sources)]:
                assert s.url.startswith("https://") or s.repo_id
                if "raw.githubusercontent.com" in s.url:  # pinned to a commit, or says why not
                    rev = s.url.split("/")[5]
                    assert (len(rev) == 40 and all(c in "0123456789abcdef" for c in rev)) or s.note, s.url


def _dev():
    root = dsrc.dev_data_root()
    if root is None:
        pytest.skip("no ../shared/data")
    return root


def test_registry_checksums_match_the_development_copy():
    root = _dev()
    for ds in REGISTRY.values():
        for f in ds.files:
            p = root / f.path
            if p.is_file():
                assert (p.stat().st_size, _sha(p.read_bytes())) == (f.size, f.sha256), f.path


_ORIGINALS = {  # input name -> where the development copy keeps the unchanged original
    "xstest_prompts.csv": "xstest/xstest_prompts.csv", "harmful_behaviors.csv": "advbench/harmful_behaviors.csv",
    "harmful-behaviors.csv": "jailbreakbench/harmful-behaviors.csv",
    "benign-behaviors.csv": "jailbreakbench/benign-behaviors.csv",
    "harmless-base/test.jsonl.gz": "hh_rlhf_harmless/harmless-base_test.jsonl.gz",
    "helpful-base/test.jsonl.gz": "hh_rlhf_helpful/original/helpful-base_test.jsonl.gz",
    "helpful-online/test.jsonl.gz": "hh_rlhf_helpful/original/helpful-online_test.jsonl.gz",
    "helpful-rejection-sampled/test.jsonl.gz": "hh_rlhf_helpful/original/helpful-rejection-sampled_test.jsonl.gz",
    "TruthfulQA.csv": "truthfulqa/TruthfulQA.csv", "mc_task.json": "truthfulqa/mc_task.json",
    "refusal.csv": "pyrit_refusal_eval/refusal.csv", "refusal_extra.csv": "pyrit_refusal_eval/refusal_extra.csv",
}


def test_converters_reproduce_the_development_copy_byte_for_byte(tmp_path):
    from saesteer.data.convert import CONVERTERS

    root = _dev()
    checked = 0
    for ds in REGISTRY.values():
        for f in ds.files:
            if f.how != "converted" or not all(i.name in _ORIGINALS for i in f.inputs):
                continue
            paths = []
            for k, i in enumerate(f.inputs):
                src = root / _ORIGINALS[i.name]
                if not src.is_file():
                    pytest.skip(f"original {src} absent")
                assert _sha(src.read_bytes()) == i.sha256, i.name
                (tmp_path / str(k)).mkdir(exist_ok=True)
                paths.append(tmp_path / str(k) / Path(i.name).name)
                paths[-1].write_bytes(src.read_bytes())
            assert _sha(CONVERTERS[f.convert](paths)) == f.sha256, f.path
            checked += 1
    assert checked == 8


def test_mmlu_converter_round_trips_a_data_tar_layout(tmp_path):
    """The MMLU archive is not kept locally: rebuild its layout from the JSONL and check the converter inverts it."""
    from saesteer.data.convert import CONVERTERS

    root = _dev()
    tar_path = tmp_path / "data.tar"
    with tarfile.open(tar_path, "w") as tar:
        for split in ("test", "dev"):
            by_subject: dict[str, io.StringIO] = {}
            for line in (root / "mmlu" / f"mmlu_{split}.jsonl").read_text(encoding="utf-8").split("\n")[:-1]:
                r = json.loads(line)
                buf = by_subject.setdefault(r["subject"], io.StringIO())
                csv.writer(buf, lineterminator="\n").writerow([r["question"], *r["choices"], r["answer_letter"]])
            for subject, buf in sorted(by_subject.items(), reverse=True):  # archive order must not matter
                b = buf.getvalue().encode("utf-8")
                info = tarfile.TarInfo(f"data/{split}/{subject}_{split}.csv")
                info.size = len(b)
                tar.addfile(info, io.BytesIO(b))
    for f in REGISTRY["mmlu"].files:
        assert _sha(CONVERTERS[f.convert]([tar_path])) == f.sha256, f.path


# --------------------------------------------------------------------------------------------- CLI
def _cli(argv, capsys):
    from saesteer.cli import main

    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_data_list(isolated, capsys):
    code, out, _ = _cli(["data", "list", "--json"], capsys)
    assert code == 0
    rows = json.loads(out)
    assert {r["name"] for r in rows} == set(REGISTRY)
    for r in rows:
        assert r["licence"] and r["citation"] and r["source"] and r["present"] is False
        assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in r["files"])
    code, out, _ = _cli(["data", "list"], capsys)
    assert code == 0
    for name in ("xstest", "jbb-harmful", "arditi-harmless", "mt-bench", "pyrit-refusal", "CC-BY-4.0", "23dc53a12ff4"):
        assert name in out


def test_cli_data_fetch(isolated, server, monkeypatch, capsys):
    f = _toy(server)
    monkeypatch.setitem(REGISTRY, "toy", DataSet("toy", "toy set", (f,), "CC0", "nobody"))
    dest = isolated / "dest"
    code, out, _ = _cli(["data", "fetch", "toy", "--dest", str(dest)], capsys)
    assert code == 0 and "fetched" in out and (dest / "toy" / "toy.jsonl").read_bytes() == PAYLOAD
    code, out, _ = _cli(["data", "fetch", "toy", "--dest", str(dest)], capsys)
    assert code == 0 and "present" in out
    code, out, _ = _cli(["data", "fetch", "toy"], capsys)  # default: the user data dir
    assert code == 0 and (dsrc.user_data_dir() / "toy" / "toy.jsonl").is_file()
    code, out, _ = _cli(["data", "list", "--json"], capsys)
    assert next(r for r in json.loads(out) if r["name"] == "toy")["where"].startswith("user:")
    for name in list(REGISTRY):  # --all over a registry of the toy set and one manual set
        if name not in ("toy", "wikipedia"):
            monkeypatch.delitem(REGISTRY, name)
    code, out, _ = _cli(["data", "fetch", "--all", "--dest", str(dest)], capsys)
    assert code == 0 and "present  toy" in out and "skipped  wikipedia" in out
    for argv, msg in ((["data", "fetch"], "pass --all"), (["data", "fetch", "nope"], "unknown data set"),
                      (["data", "fetch", "wikipedia", "--dest", str(dest)], "cannot be fetched automatically")):
        code, _, err = _cli(argv, capsys)
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, (argv, err)
    monkeypatch.setitem(REGISTRY, "toy", DataSet("toy", "toy", (DataFile(f.path, "3" * 64, f.size, f.sources),),
                                                 "CC0", "nobody"))
    code, _, err = _cli(["data", "fetch", "toy", "--dest", str(isolated / "bad")], capsys)
    assert code == 2 and "checksum mismatch" in err and len(err.strip().splitlines()) == 1
    assert _all_files(isolated / "bad") == []
