"""report.html, opened in a real headless Chromium (Debian's ``chromium``; .ci/run installs
it as root): the page renders (a screenshot that is not blank), the DOM after its script
ran holds the plot with one point per completed run and one table row per trial, the
sort the address asks for, and the console stays silent. A page that does throw, log an
error or reach outside itself is caught by the same check, so a silent console means
something. Without chromium the browser tests skip and say why; the page's own checks
(self-contained, escaped, config diffs) run anyway."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html import unescape
from pathlib import Path

import pytest

from ftx.tracking.report import write_report

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no `chromium` on PATH (Debian's chromium package; .ci/run installs it when root)"
)
MIB = 2**20
NASTY = '3-dora<u>&"'  # a run name that must come out as text, not markup

# name: (method, rank, task score, peak MiB, predicted MiB, lr, status)
RUNS = {
    "0-full": ("full", None, 0.785, 399.5, 420.0, 0.003, "completed"),
    "1-lora": ("lora", 16, 0.637, 366.4, 350.0, 0.003, "completed"),
    "2-qlora": ("qlora", 16, 0.625, 394.4, 300.2, 0.001, "completed"),
    NASTY: ("dora", 16, 0.582, 527.4, None, 0.003, "completed"),
    "4-lora": ("lora", 64, None, 380.0, 360.0, 0.01, "failed"),
}


def write_runs(root: Path) -> None:
    """The two files of a run directory the report reads; YAML is a superset of JSON, so both are json.dumps."""
    for name, (method, rank, score, peak, predicted, lr, status) in RUNS.items():
        run = root / name
        (run / ".hydra").mkdir(parents=True)
        config = {
            "method": {"name": method, "adapter": None if method == "full" else "lora", "r": rank or 8},
            "optim": {"lr": lr},
            "data": {"name": "pydoc", "max_length": 256},
        }
        (run / ".hydra" / "config.yaml").write_text(json.dumps(config))
        record = {
            "method": method,
            "quant": "nf4" if method == "qlora" else "none",
            "precision": "32-true",
            "status": status,
            "quality": {"task_score": score, "eval_loss": 1 - (score or 0)},
            "memory": {"peak_bytes": int(peak * MIB), "predicted_bytes": predicted and int(predicted * MIB)},
            "params": {"trainable": 1000},
            "throughput": {"tokens_per_s": 3000.0},
        }
        (run / "metrics.json").write_text(json.dumps(record))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    write_runs(root)
    out, _ = write_report([root], root)
    return out / "report.html"


def chromium(url: str, profile: Path, *flags: str) -> subprocess.CompletedProcess:
    """Headless Chromium on ``url`` with the page's console in its stderr log (root needs --no-sandbox)."""
    command = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}"]
    command += ["--enable-logging=stderr", "--v=0", "--no-first-run", *flags, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def console_messages(stderr: str) -> list[str]:
    """The page's console in Chromium's log: console.* calls, uncaught exceptions and CSP refusals all log a
    ``CONSOLE`` line. The log gives no level, and report.html writes nothing to the console, so every one counts."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def table_runs(dom: str) -> list[str]:
    """The run names of the trials table's body rows, in the order the page shows them."""
    body = re.search(r'<table id="trials"[^>]*>.*?<tbody>(.*?)</tbody>', dom, re.S).group(1)
    return [unescape(name) for name in re.findall(r'<tr data-run="([^"]*)"', body)]


def test_report_html_is_self_contained_escaped_and_diffs_configs(report):
    page = report.read_text()
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    assert not re.search(r"https?://|\bsrc=|\bhref=|@import|url\(", page)  # nothing to fetch
    assert "<u>" not in page and "3-dora&lt;u&gt;&amp;&quot;" in page
    assert page.count('class="measured"') == 4  # completed runs only; the failed one has no quality
    assert page.count('class="predicted"') == 3  # NASTY has no prediction
    assert table_runs(page) == ["0-full", "1-lora", "2-qlora", NASTY, "4-lora"]  # report.md's order
    qlora = re.search(r'<details class="config" data-run="2-qlora".*?</details>', page, re.S).group(0)
    keys = re.findall(r"<tr><td><code>([^<]*)</code>", qlora)
    assert keys == ["method.adapter", "method.name", "method.r", "optim.lr"]  # data.* is the same everywhere
    assert 'data-differences="4"' in qlora


@needs_chromium
@pytest.mark.parametrize(
    "sort, order",
    [
        ("-memory.peak_bytes", [NASTY, "0-full", "2-qlora", "4-lora", "1-lora"]),
        ("memory.predicted_bytes", ["2-qlora", "1-lora", "4-lora", "0-full", NASTY]),  # a missing figure last
        ("method", [NASTY, "0-full", "1-lora", "4-lora", "2-qlora"]),  # text; ties keep the report's order
    ],
)
def test_report_html_renders_in_chromium(report, tmp_path, sort, order):
    out = chromium(f"{report.as_uri()}#sort={sort}", tmp_path / "profile", "--dump-dom")
    assert out.returncode == 0, out.stderr[-3000:]
    assert console_messages(out.stderr) == []
    dom = out.stdout
    assert '<html lang="en" data-ready="true">' in dom  # the script ran to its end
    assert dom.count('<svg id="scatter"') == 1 and dom.count('class="measured"') == 4
    assert f'data-sorted-by="{sort}"' in dom
    assert table_runs(dom) == order
    assert "<u>" not in dom and "3-dora&lt;u&gt;&amp;" in dom  # the name as text


@needs_chromium
def test_report_html_screenshot_is_not_blank(report, tmp_path):
    import matplotlib.image
    import numpy as np

    shot = tmp_path / "report.png"
    out = chromium(report.as_uri(), tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2000")
    assert out.returncode == 0, out.stderr[-3000:]
    assert console_messages(out.stderr) == []
    image = matplotlib.image.imread(shot)
    assert image.shape[:2] == (2000, 1280)
    colours = np.unique(image[::4, ::4, :3].reshape(-1, 3), axis=0)
    assert len(colours) > 50  # text, markers in each method's colour, the table: not a blank or one-colour page


@needs_chromium
def test_console_check_catches_a_throw_an_error_and_an_outside_load(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text(
        "<!doctype html><html><head>"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; script-src 'unsafe-inline'\">"
        '</head><body><img src="https://example.invalid/plot.png">'
        '<script>console.error("logged on purpose"); throw new Error("thrown on purpose");</script>'
        "</body></html>"
    )
    out = chromium(page.as_uri(), tmp_path / "profile", "--dump-dom")
    messages = "\n".join(console_messages(out.stderr))
    assert "logged on purpose" in messages
    assert "Uncaught Error: thrown on purpose" in messages
    assert "Content Security Policy" in messages and "example.invalid" in messages
