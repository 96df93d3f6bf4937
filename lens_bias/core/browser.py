"""Open an HTML page in headless Chromium, offline, as a reader would: does every plotly figure render?

`check_page(path)` loads a copy of the page with a small script put first in it that records every
uncaught error, failed resource, rejected promise and `console.error` call; Chromium dumps the DOM after
the page has run (`--dump-dom`), and each plotly figure `div` must hold a rendered plot (an element of
class `main-svg`). `screenshot(path, png, width)` takes the first screen at a window width. Both run with
a fresh profile and no network (the flags below), so a page that needs the network fails here too.

Used by the tests (the locate report, the demo's figures) and docs/make_locate_report_png.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

#: headless, no GPU, no network, no first-run or background work; a fresh --user-data-dir is added per run
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--mute-audio")
NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
ERRORS_ATTR = "data-lens-bias-errors"
#: recorded into an attribute of <html>, which --dump-dom serialises
CAPTURE = """<script>(function(){var errs=[],root=document.documentElement;
function rec(m){errs.push(String(m));root.setAttribute('%s',JSON.stringify(errs));}
root.setAttribute('%s','[]');
window.addEventListener('error',function(e){if(e.message!==undefined){rec(e.message+' ('+(e.filename||'?')+':'+
(e.lineno||'?')+')');}else{var t=e.target||{};rec('failed to load '+(t.src||t.href||t.tagName||'a resource'));}},true);
window.addEventListener('unhandledrejection',function(e){var r=e.reason;rec('unhandled rejection: '+(r&&r.message||r));});
var ce=console.error;console.error=function(){rec(Array.prototype.map.call(arguments,String).join(' '));
return ce.apply(console,arguments);};})();</script>""" % (ERRORS_ATTR, ERRORS_ATTR)  # noqa: UP031 - JavaScript: str.format would need every brace doubled


class BrowserMissing(RuntimeError):
    """No Chromium on this machine (install it: apt-get install -y chromium)."""


def find_chromium() -> str | None:
    """The path of a Chromium (or Chrome) executable, or None."""
    for name in NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    exe = find_chromium()
    if exe is None:
        raise BrowserMissing("no chromium on PATH (install it: apt-get install -y chromium)")
    with tempfile.TemporaryDirectory(prefix="lens-bias-chromium-") as profile:
        return subprocess.run([exe, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                              timeout=timeout, check=False)


class _Figures(HTMLParser):
    """For every plotly figure div (class plotly-graph-div): its id and how many main-svg elements it holds."""

    VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"})

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, int | None]] = []  # (tag, index of the figure it opens)
        self.figures: list[dict] = []
        self.errors: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "html" and ERRORS_ATTR in a:
            self.errors = json.loads(a[ERRORS_ATTR] or "[]")
        classes = (a.get("class") or "").split()
        if "main-svg" in classes:
            for _, fig in self.stack:
                if fig is not None:
                    self.figures[fig]["main_svg"] += 1
        if tag in self.VOID:
            return
        fig = None
        if tag == "div" and "plotly-graph-div" in classes:
            fig = len(self.figures)
            self.figures.append({"id": a.get("id", f"figure {fig + 1}"), "main_svg": 0})
        self.stack.append((tag, fig))

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID and self.stack and self.stack[-1][0] == tag:
            self.stack.pop()

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                return


@dataclass
class PageCheck:
    """What a reader's browser made of a page: errors, and every figure div with its main-svg count."""

    path: Path
    errors: list[str]
    figures: list[dict]
    console: list[str] = field(default_factory=list)

    @property
    def blank(self) -> list[str]:
        """Ids of the figure divs that hold no rendered plot."""
        return [f["id"] for f in self.figures if not f["main_svg"]]

    @property
    def ok(self) -> bool:
        return bool(self.figures) and not self.errors and not self.blank

    def __str__(self) -> str:
        return (f"{self.path}: {len(self.figures)} figure(s), {len(self.blank)} blank {self.blank}; "
                f"{len(self.errors)} error(s) {self.errors}")


def _with_capture(text: str) -> str:
    """The page with CAPTURE first: right after <head>, or after <html>, or at the very start."""
    low = text[:4096].lower()
    for tag in ("<head", "<html"):
        at = low.find(tag)
        if at >= 0:
            end = text.index(">", at) + 1
            return text[:end] + CAPTURE + text[end:]
    return CAPTURE + text


def check_page(path: str | Path, *, timeout: float = 180, budget_ms: int = 10000) -> PageCheck:
    """Load `path` headless (offline, fresh profile) and return its errors and figures (see PageCheck.ok)."""
    path = Path(path).resolve()
    with tempfile.TemporaryDirectory(prefix="lens-bias-page-") as tmp:
        copy = Path(tmp) / path.name
        copy.write_text(_with_capture(path.read_text(encoding="utf-8")), encoding="utf-8")
        res = _run(["--enable-logging=stderr", "--v=0", f"--virtual-time-budget={budget_ms}", "--dump-dom",
                    copy.as_uri()], timeout)
    parser = _Figures()
    parser.feed(res.stdout)
    console = [line.split("] ", 1)[-1] for line in res.stderr.splitlines() if ":CONSOLE" in line]
    errors = list(parser.errors or [])
    if parser.errors is None:
        errors.append(f"the page did not run (chromium exit {res.returncode}; {res.stderr.strip()[-300:]})")
    return PageCheck(path, errors, parser.figures, console)


def screenshot(path: str | Path, png: str | Path, width: int = 1400, height: int = 900, *, scroll: int = 0,
               timeout: float = 180, budget_ms: int = 10000) -> Path:
    """A PNG of the page at a window `width` × `height` px: its first screen, or the screen `scroll` px down."""
    path, png = Path(path).resolve(), Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="lens-bias-page-") as tmp:
        page = path
        if scroll:
            page = Path(tmp) / path.name
            page.write_text(path.read_text(encoding="utf-8") + f"<script>addEventListener('load',function()"
                            f"{{window.scrollTo(0,{int(scroll)});}});</script>", encoding="utf-8")
        res = _run([f"--window-size={width},{height}", f"--virtual-time-budget={budget_ms}", f"--screenshot={png}",
                    page.as_uri()], timeout)
    if not png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot of {path} (exit {res.returncode}): {res.stderr.strip()[-300:]}")
    return png


__all__ = ["FLAGS", "BrowserMissing", "PageCheck", "check_page", "find_chromium", "screenshot"]
