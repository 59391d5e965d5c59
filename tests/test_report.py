"""Sweep report: pooled rates, highlighted condition, self-contained HTML, PNGs, and a headless-Chromium screenshot."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from saesteer.core import SaesteerError, rate_summary
from saesteer.experiments import condition_rows, slug
from saesteer.experiments import report as report


def fake_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    conds = [{"name": "unsteered", "kind": "unsteered"}]
    conds += [{"name": f"clamp f5={v:g}", "kind": "clamp", "feature": 5, "clamp": float(v), "clamp_from": "abs"}
              for v in (0, 4, 8)]
    conds += [{"name": "control clamp f9=8", "kind": "control", "feature": 9, "clamp": 8.0, "clamp_from": "abs"}]
    refuse_unsafe = {"unsteered": 12, "clamp f5=0": 10, "clamp f5=4": 17, "clamp f5=8": 19, "control clamp f9=8": 12}
    refuse_safe = {"unsteered": 1, "clamp f5=0": 0, "clamp f5=4": 3, "clamp f5=8": 14, "control clamp f9=8": 2}
    mmlu = {"unsteered": 20, "clamp f5=0": 20, "clamp f5=4": 18, "clamp f5=8": 11, "control clamp f9=8": 19}
    rows = []
    for c in conds:
        n = c["name"]
        refusal = {"subsets": {
            "advbench-test": {**rate_summary(refuse_unsafe[n], 20), "kind": "refusal", "categories": {}},
            "xstest-safe": {**rate_summary(refuse_safe[n], 20), "kind": "over-refusal",
                            "categories": {"homonyms": rate_summary(refuse_safe[n] // 2, 10),
                                           "privacy": rate_summary(refuse_safe[n] - refuse_safe[n] // 2, 10)}}}}
        rows += condition_rows(c, refusal, {"mmlu": rate_summary(mmlu[n], 40)}, ["advbench:test"])
        items = [{"id": str(i), "subset": sub, "prompt": f"<b>prompt {i}</b> of {sub}",
                  "answer": ("I'm sorry" if (i + len(n)) % 2 else "Sure, here") + f" ({n})", "label": bool((i + len(n)) % 2)}
                 for sub in ("advbench-test", "xstest-safe") for i in range(6)]
        d = run / "conditions" / slug(n) / "refusal"
        d.mkdir(parents=True)
        (d / "items.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "sweep.json").write_text(json.dumps({"config": {"model": "tiny", "sae": "s", "seed": 0}}))
    return run


def test_pooled_and_highlight(tmp_path):
    run = fake_run(tmp_path)
    rows, _ = report.load_run(run)
    un = report.pooled(rows, "unsafe")
    assert un["clamp f5=4"]["k"] == 17 and un["clamp f5=4"]["n"] == 20
    # best pooled unsafe − safe among feature clamps: f5=4 (0.85 − 0.15) beats f5=8 (0.95 − 0.70)
    assert report.highlight(rows) == "clamp f5=4"
    assert report.highlight(rows, "clamp f5=8") == "clamp f5=8"
    with pytest.raises(SaesteerError, match="no condition"):
        report.highlight(rows, "clamp f5=99")


def test_report_files_and_self_contained_html(tmp_path):
    run = fake_run(tmp_path)
    html_path = report.make_report(run)
    assert html_path == run / "report" / "index.html"
    for png in ("tradeoff.png", "clamp.png", "categories.png"):
        data = (run / "report" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    page = html_path.read_text()
    imgs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(imgs) == 3 and base64.b64decode(imgs[0])[:4] == b"\x89PNG"
    assert not re.search(r'(src|href)="(http|//|file:)', page)  # nothing loaded from outside
    assert "17 / 20" in page and "[0.640, 0.948]" in page  # k / n and Wilson interval of clamp f5=4 on advbench
    assert '<tr class="hl"><td>clamp f5=4</td>' in page
    assert "&lt;b&gt;prompt 0&lt;/b&gt;" in page and "<b>prompt 0</b>" not in page  # escaped
    assert "Sure, here (unsteered)" in page and "(clamp f5=4)" in page


def test_report_errors(tmp_path):
    with pytest.raises(SaesteerError, match="run folder not found"):
        report.make_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SaesteerError, match="no results.jsonl rows"):
        report.make_report(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad/results.jsonl").write_text('{"condition": "x", "metric": "m"}\n')
    with pytest.raises(SaesteerError, match="lacks"):
        report.make_report(tmp_path / "bad")


def test_report_renders_in_headless_chromium(tmp_path):
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (make test installs it)")
    from PIL import Image

    page = report.make_report(fake_run(tmp_path))
    shot = tmp_path / "shot.png"
    r = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'prof'}",
                        f"--screenshot={shot}", "--window-size=1200,1600", page.resolve().as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert shot.exists(), r.stderr[-2000:]
    img = Image.open(io.BytesIO(shot.read_bytes())).convert("L")
    px = list(img.tobytes())
    mean = sum(px) / len(px)
    var = sum((p - mean) ** 2 for p in px) / len(px)
    assert img.size == (1200, 1600)
    assert var > 100, f"screenshot looks blank (pixel variance {var:.1f})"
    assert sum(p < 128 for p in px) > 2000  # text, table lines and plots drew dark pixels
