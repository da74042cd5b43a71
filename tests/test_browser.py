"""The tiny run's report in a real browser (headless Chromium): images load, no console messages, the
``<script>`` description stays text, and a screenshot is saved (its path is printed: ``pytest -s``).

The page itself records whether its images loaded (``<body data-broken-images>``, set on ``load`` by the
report's own script); ``--dump-dom`` gives the DOM after scripts ran and ``--enable-logging=stderr`` prints
every console message as a ``CONSOLE`` line. A first test checks on a deliberately broken page that this
detection does catch a missing image, a console error and an uncaught exception.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from test_report import tiny_report

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
CHROME = next((p for p in map(shutil.which, BROWSERS) if p), None)
pytestmark = pytest.mark.skipif(CHROME is None, reason="no Chromium/Chrome on PATH (Debian: apt-get install chromium)")


def _chrome(tmp: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROME, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
           f"--user-data-dir={tmp / 'chrome-profile'}", "--enable-logging=stderr", "--v=0",
           "--virtual-time-budget=10000", "--window-size=1300,2400", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def load(tmp: Path, page: Path) -> tuple[str, list[str]]:
    """(DOM after the page's scripts ran, console messages) of a local page."""
    proc = _chrome(tmp, page.resolve().as_uri(), "--dump-dom")
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return proc.stdout, console


def _attr(dom: str, name: str) -> str | None:
    m = re.search(rf'<body[^>]*\s{name}="([^"]*)"', dom)
    return m.group(1) if m else None


@pytest.fixture(scope="module")
def report(tfds_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_report(tmp_path_factory)[1]


def test_detection_catches_broken_pages(tmp_path: Path) -> None:
    """A missing image, a console error and an exception are each seen (so the checks below can fail)."""
    from jinja2 import Environment, PackageLoader

    base = Environment(loader=PackageLoader("ablations.report", "templates")).get_template("base.html")
    page = tmp_path / "broken.html"
    page.write_text(base.render(name="x").replace(
        '<p id="broken-images"', '<img src="missing.png"><script>console.error("boom"); nope();</script>'
                                  '<p id="broken-images"'))
    dom, console = load(tmp_path, page)
    assert _attr(dom, "data-broken-images") == "1" and _attr(dom, "data-images") == "1"
    assert "1 figure(s) could not be loaded: missing.png" in dom
    assert any('"boom"' in c for c in console) and any("nope is not defined" in c for c in console)


def test_report_renders_with_all_images_and_no_console_messages(report: Path, tmp_path: Path) -> None:
    dom, console = load(tmp_path, report / "index.html")
    assert console == []
    assert _attr(dom, "data-broken-images") == "0"
    assert int(_attr(dom, "data-images")) >= 10
    shot = tmp_path / "report.png"
    proc = _chrome(tmp_path, (report / "index.html").resolve().as_uri(), f"--screenshot={shot}")
    assert proc.returncode == 0 and shot.stat().st_size > 20_000, proc.stderr[-2000:]
    print(f"\nscreenshot of the report: {shot}")


def test_script_in_description_is_shown_as_text(report: Path, tmp_path: Path) -> None:
    dom, _ = load(tmp_path, report / "index.html")
    assert "pwned" not in re.search(r"<html[^>]*>", dom).group(0)  # the injected script did not run
    desc = re.search(r'<p class="desc">(.*?)</p>', dom, re.S).group(1)
    assert desc.startswith("Tiny run &lt;script&gt;document.documentElement.dataset.pwned")
    assert "&lt;/script&gt; &amp; more" in desc


def test_arm_pages_render(report: Path, tmp_path: Path) -> None:
    # The diverged arm's page (its status line, not the stylesheet every page carries).
    page = next(p for p in sorted(report.glob("arms/*/index.html")) if '<span class="diverged">' in p.read_text())
    dom, console = load(tmp_path, page)
    assert console == [] and _attr(dom, "data-broken-images") == "0" and int(_attr(dom, "data-images")) >= 3
