"""Headless Chromium for the explorer page (bench/explore.py and tests/test_explore.py): open a file with a URL
fragment, read the DOM after the page's scripts ran, or take a screenshot.

Debian's `chromium` (`apt-get install -y chromium`; .ci/run installs it). It runs as root only without its
sandbox, and on a closed network only with its background services off (otherwise their connections are
refused many at a time); every run gets a fresh profile folder.
"""

from __future__ import annotations

import html.parser
import os
import resource
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def find_chromium() -> str | None:
    """The Chromium executable ($CHROMIUM, else `chromium` or `chromium-browser` on PATH), or None."""
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def run_page(page: str | os.PathLike, fragment: str, *args: str, timeout: float = 120) -> tuple[str, float]:
    """Open `page#fragment` in headless Chromium with the extra `args`: its standard output, and the CPU seconds
    (user + system) of every Chromium process, a measure that a loaded machine does not inflate."""
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("chromium is not installed (apt-get install -y chromium)")
    url = Path(page).resolve().as_uri() + (f"#{fragment}" if fragment else "")
    with tempfile.TemporaryDirectory(prefix="chromium_profile_") as profile:
        cmd = [exe, *FLAGS, f"--user-data-dir={profile}", *args, url]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"chromium exited with {proc.returncode}: {proc.stderr[-2000:]}")
    return proc.stdout, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def dump_dom(page: str | os.PathLike, fragment: str = "", *, timeout: float = 120) -> str:
    """The page's DOM as HTML once it has loaded (its scripts have run)."""
    return run_page(page, fragment, "--dump-dom", timeout=timeout)[0]


def screenshot(
    page: str | os.PathLike, out: str | os.PathLike, fragment: str = "", *, size=(1200, 900), timeout: float = 120
) -> Path:
    """A PNG of the loaded page's first `size` (width, height) pixels."""
    run_page(
        page, fragment, f"--window-size={size[0]},{size[1]}", f"--screenshot={Path(out).resolve()}", timeout=timeout
    )
    return Path(out)


class _Elements(html.parser.HTMLParser):
    """Attributes and text of every element that has an id."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.by_id: dict[str, dict] = {}
        self._open: list[str | None] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        ident = attrs.get("id")
        if ident is not None:
            self.by_id[ident] = {"tag": tag, "attrs": attrs, "text": ""}
        if tag not in ("img", "input", "br", "meta", "link"):  # void elements have no end tag
            self._open.append(ident)

    def handle_endtag(self, tag):
        if self._open:
            self._open.pop()

    def handle_data(self, data):
        for ident in self._open:
            if ident is not None:
                self.by_id[ident]["text"] += data


def elements_by_id(dom: str) -> dict[str, dict]:
    """{id: {"tag", "attrs", "text"}} of a dumped DOM."""
    parser = _Elements()
    parser.feed(dom)
    return parser.by_id
