"""What the browser tests share: the browser (or the skip: CI sets REQUIRE_BROWSER_TESTS=1, which makes a
missing browser a failure), a dashboard served in a thread, and waiting on the page."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
from pathlib import Path

import pytest
from conftest import wait_for

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
if os.environ.get("REQUIRE_BROWSER_TESTS") != "1":
    pytest.importorskip("playwright", reason="playwright is not installed")
    if BROWSER is None:
        pytest.skip("no chromium on this machine (CI installs it)", allow_module_level=True)

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@contextlib.contextmanager
def serving(*run_dirs: Path):
    """The dashboard for run_dirs on a free loopback port, in a thread; yields the URL with its token."""
    import uvicorn

    from gptrain.dashboard.server import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(list(run_dirs), "tok", {"127.0.0.1", "localhost"})
    instance = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=instance.run)
    thread.start()
    wait_for(lambda: instance.started)
    try:
        yield f"http://127.0.0.1:{port}/#token=tok"
    finally:
        instance.should_exit = True
        thread.join(10)


def wait_js(page, expression: str, seconds: float = 30.0) -> None:
    """Poll a JS expression from the test side (the page's CSP forbids the eval Playwright's
    wait_for_function would use, and that CSP stays on)."""
    wait_for(lambda: page.evaluate(f"() => Boolean({expression})"), seconds)
