"""The dashboard page in a real headless Chromium (Debian's chromium driven by Playwright), against a
tiny training that is running: charts fill and grow, pause really pauses, save-now saves, the prompt
box answers. CI installs Chromium and sets REQUIRE_BROWSER_TESTS=1, which makes a missing browser a
failure; elsewhere the test is skipped with the reason. The screenshot goes to test-artifacts/."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from conftest import wait_for
from page_helpers import ARTIFACTS, BROWSER, serving, wait_js


def _train_rows(run: Path) -> int:
    if not (run / "metrics.jsonl").is_file():
        return 0
    return sum(1 for line in (run / "metrics.jsonl").read_text().splitlines() if '"kind": "train"' in line)


@pytest.fixture
def live_run(tmp_path, corpus_dir, monkeypatch):
    """A tiny training that runs until stopped (steps slowed to ~20 ms), in a thread."""
    from gptrain.config import resolve_config
    from gptrain.train import loop

    real = loop.step_run
    monkeypatch.setattr(loop, "step_run", lambda *a, **k: (time.sleep(0.02), real(*a, **k))[1])
    cfg = resolve_config(None, {"data.source": str(corpus_dir), "data.data_dir": str(tmp_path / "ds"),
                                "tokenizer.kind": "char", "embd": 16, "layers": 1, "heads": 1, "context": 16,
                                "batch-size": 4, "steps": 100_000, "eval.every_steps": 25, "samples.every_steps": 50,
                                "samples.num_tokens": 20, "checkpoint.every_steps": 0, "log.is_quiet": True,
                                "log.live": "off", "train.compile": "off",  # a long run: no compile probe
                                "run_dir": str(tmp_path / "run")}, environ={})
    thread = threading.Thread(target=loop.train, args=(cfg,), kwargs={"log": lambda *_: None})
    thread.start()
    run = tmp_path / "run"
    try:
        wait_for(lambda: _train_rows(run) >= 30, seconds=120)
        yield run
        thread.join(10)  # the test stops the run from the page; it may still be writing its last checkpoint
    finally:
        _stop(thread, run)


def _stop(thread: threading.Thread, run: Path) -> None:
    """Stop a run the test (or the fixture) left training, even one not yet taking commands."""
    from gptrain.errors import UserError
    from gptrain.train.control import send_command

    deadline = time.monotonic() + 120
    while thread.is_alive() and time.monotonic() < deadline:
        try:
            send_command(run, "stop")
            thread.join(30)
        except UserError:  # no run directory or trainer yet (still measuring its fast paths)
            time.sleep(0.2)


@pytest.fixture
def server(live_run):
    with serving(live_run) as url:
        yield url


def test_corpus_text_is_shown_as_text_never_run_as_html(tmp_path):
    from playwright.sync_api import sync_playwright

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text('name = "x"\n')
    evil = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">'
    rows = [{"kind": "train", "step": 1, "loss": 2.0, "lr": 1e-3}, {"kind": "sample", "step": 1, "text": evil},
            {"kind": "event", "step": 1, "message": evil}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with serving(run) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=BROWSER, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(url)
        wait_js(page, "document.getElementById('samples').textContent.length > 0")
        assert evil in page.inner_text("#samples") and evil in page.inner_text("#events")
        assert page.evaluate("() => window.pwned") is None and page.query_selector("#samples img") is None
        browser.close()


def test_the_page_follows_and_steers_a_live_run(live_run, server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=BROWSER, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        page.goto(server)
        wait_js(page, "document.getElementById('status').textContent.startsWith('step')")
        points = "document.getElementById('chart-loss').data[0].x.length"
        first = page.evaluate(points)
        assert first >= 30  # the loss chart holds the run's points
        wait_js(page, f"{points} > {first}")  # new rows arrive without a reload
        page.click("button[data-command=pause]")
        wait_js(page, "document.getElementById('control-answer').textContent.startsWith('paused')")
        wait_js(page, "document.getElementById('status').textContent.endsWith('paused')")
        paused = _train_rows(live_run)
        time.sleep(2.0)
        assert _train_rows(live_run) == paused  # really paused
        page.click("button[data-command=save]")
        wait_js(page, "document.getElementById('control-answer').textContent.includes('saved')")
        answer = page.inner_text("#control-answer")
        wait_for(lambda: (live_run / "checkpoints" / answer.split()[1]).is_dir())
        page.click("button[data-command=resume]")
        wait_for(lambda: _train_rows(live_run) > paused + 5)
        page.fill("#prompt", "KING")
        page.click("#generate")
        wait_js(page, "document.getElementById('generated').textContent.length > 10")
        samples = page.inner_text("#samples")
        rows = [json.loads(line) for line in (live_run / "metrics.jsonl").read_text().splitlines()]
        assert any(r["kind"] == "sample" for r in rows) and "step 50" in samples
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        page.click("button[data-command=stop]")
        wait_js(page, "document.getElementById('control-answer').textContent.startsWith('stopping')")
        browser.close()
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
