"""The report in a real browser: headless Chromium renders the page of a short run, takes a screenshot and dumps
the DOM after the page's own script ran; the episodes, the coloured token spans and the plots must be there.

Skipped where no Chromium binary exists; CI (``.ci/run``) installs Debian's ``chromium``."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser

import pytest

from ippo.inspection import inspect_run
from ippo.rl.loop import train

from .conftest import KEEP

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
CHROMIUM = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary on PATH (looked for "
                                + ", ".join(BROWSERS) + "); CI installs one: apt-get install -y chromium")
WIDTH, HEIGHT = 1100, 2200


def parity(response: str, gold: str) -> str:
    """A category hook (``module:function``) for the test: the response's length, even or odd."""
    return "even length" if len(response) % 2 == 0 else "odd length"


def headless(tmp_path, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={WIDTH},{HEIGHT}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)


class Elements(HTMLParser):
    """Every element's tag, attributes and whether an ancestor hides it (``display: none``)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, dict, bool]] = []
        self.stack: list[bool] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        hidden = (self.stack[-1] if self.stack else False) or "display: none" in (a.get("style") or "")
        self.found.append((tag, a, hidden))
        if tag not in ("meta", "br", "img", "input", "link", "circle", "line", "rect", "polyline"):
            self.stack.append(hidden)

    def handle_endtag(self, tag):
        if tag not in ("meta", "br", "img", "input", "link", "circle", "line", "rect", "polyline") and self.stack:
            self.stack.pop()

    def having(self, tag: str, cls: str) -> list[tuple[dict, bool]]:
        return [(a, h) for t, a, h in self.found if t == tag and (not cls or cls in (a.get("class") or "").split())]


def png_facts(path) -> tuple[int, int, int]:
    """(width, height, distinct byte values of the decompressed image data): a blank page has very few."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    pos, idat = 8, b""
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + n]
        pos += 12 + n
    return width, height, len(set(zlib.decompress(idat)))


def test_the_report_renders_in_chromium(make_cfg, tmp_path):
    run = tmp_path / "run"
    train(make_cfg(*KEEP, run_dir=run))
    page = tmp_path / "report" / "inspect.html"
    res = inspect_run(run, [2], page, category="tests.inspection.test_browser:parity", top=4, sample=2)
    assert res.recomputed[2].all_match

    shot = tmp_path / "screenshot.png"
    done = headless(tmp_path, f"--screenshot={shot}", page.as_uri())
    assert shot.is_file(), done.stderr[-2000:]
    width, height, variety = png_facts(shot)
    assert (width, height) == (WIDTH, HEIGHT) and variety > 40, "the screenshot looks blank"

    dom = headless(tmp_path, "--dump-dom", page.as_uri())
    assert dom.returncode == 0 and "</html>" in dom.stdout, dom.stderr[-2000:]
    els = Elements()
    els.feed(dom.stdout)
    # the episodes: those of iteration 2 shown (the filter starts on it), the other iterations' hidden by the script
    cards = els.having("div", "ep")
    shown = [a for a, hidden in cards if not hidden]
    assert shown and all(a["data-iteration"] == "2" for a in shown)
    assert any(hidden for a, hidden in cards if a["data-iteration"] != "2")
    links = [a for a, _ in els.having("a", "") if a.get("href") == "../run/influence.jsonl"]
    assert len(re.findall(r"influence\.jsonl line \d+", dom.stdout)) == len(cards) and len(links) > len(cards)
    # every response token of the shown episodes is a span with a colour and its value on hover
    tokens = [a for a, hidden in els.having("span", "tok") if not hidden]
    attributed = res.recomputed[2].episodes.values()
    assert len(tokens) == sum(len(a.tokens) for a in attributed)
    colors = [re.search(r"background:\s*(#[0-9a-f]{6}|rgb\([^)]*\))", a["style"]).group(1) for a in tokens]
    assert all(re.fullmatch(r"token \d+ .*: [+-]\d\.\d{3}e[+-]\d+", a["title"]) for a in tokens)
    assert len(set(colors)) > 5  # a scale, not one colour
    negative = [a for a in tokens if a["title"].split(": ")[-1].startswith("-")]
    assert negative, "no token pulls against the validation set?"
    # the plots: kept fraction, scores by reward and by category, weights
    for cls in ("kept-fraction", "scores-by-reward", "scores-by-category", "weights"):
        assert els.having("svg", cls), cls
    assert "even length" in dom.stdout and "equal the logged ones" in dom.stdout
