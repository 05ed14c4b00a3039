"""The dashboard page in a real headless Chromium against run directories written by the test: a
100,000-step metrics file opens thinned, a second run overlays the first, system rows with GPU figures
draw, and rows, the log and checkpoints that appear later show up without a reload, also after the
metrics file was cut back by a resume."""

from __future__ import annotations

import json
import time
from pathlib import Path

from conftest import wait_for
from page_helpers import ARTIFACTS, BROWSER, serving, wait_js

NUM_STEPS = 100_000
TRACES = "document.getElementById('chart-loss').data"


def _rows(num_steps: int, val_every: int, loss0: float) -> list[dict]:
    rows = []
    for step in range(1, num_steps + 1):
        rows.append({"kind": "train", "step": step, "time": 1e9 + step, "loss": loss0 / (1 + step / 1000),
                     "lr": 1e-3, "grad_norm": 1.0, "tokens_per_second": 5e4, "mfu": 0.31, "tokens_seen": step * 512})
        if step % val_every == 0:
            rows.append({"kind": "val", "step": step, "time": 1e9 + step, "val_loss": loss0 / (1 + step / 900),
                         "tokens_seen": step * 512})
        if step % 500 == 0:
            rows.append({"kind": "system", "step": step, "time": 1e9 + step, "cpu_percent": 98.0,
                         "memory_percent": 12.0, "gpu_utilization": 97, "gpu_memory_percent": 61.0})
    return rows


def _write_run(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir()
    (folder / "config.toml").write_text(f'name = "{folder.name}"\n')
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "train.log").write_text("12:00:00 run started\n")
    return folder


def _append(path: Path, rows: list[dict]) -> None:
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))


def _checkpoint(run: Path, name: str, step: int) -> None:
    (run / "checkpoints" / name).mkdir(parents=True)
    (run / "checkpoints" / name / "state.json").write_text(json.dumps({"train": {"step": step}}))


def test_a_big_run_opens_thinned_overlays_another_and_follows_cut_backs(tmp_path):
    from playwright.sync_api import sync_playwright

    big = _write_run(tmp_path / "big", _rows(NUM_STEPS, 1000, 10.0))
    small = _write_run(tmp_path / "small", _rows(300, 100, 8.0))
    assert (big / "metrics.jsonl").stat().st_size > 15_000_000
    with serving(big, small) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=BROWSER, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        started = time.monotonic()
        page.goto(url)
        wait_js(page, f"document.getElementById('status').textContent.startsWith('step {NUM_STEPS}')")
        print(f"a {NUM_STEPS:,}-step metrics file opened in {time.monotonic() - started:.1f}s")
        train_points = page.evaluate(f"() => {TRACES}[0].x.length")
        assert 1000 <= train_points <= 2001  # thinned for drawing
        assert page.evaluate(f"() => {TRACES}[2].x.length") == NUM_STEPS // 1000  # every val row
        system = page.evaluate("() => document.getElementById('chart-system').data.map((t) => t.name)")
        assert "GPU utilisation %" in system and "GPU memory %" in system
        assert page.evaluate("() => document.getElementById('chart-mfu').data[0].y.at(-1)") == 31.0
        wait_js(page, "document.getElementById('log').textContent.includes('run started')")

        page.check("#overlay input[data-run='1']")  # the small run, drawn over the big one
        wait_js(page, f"{TRACES}.some((t) => t.name === 'small val')")
        assert page.evaluate(f"() => {TRACES}.find((t) => t.name === 'small val').x.length") == 3

        _append(big / "metrics.jsonl", [{"kind": "train", "step": NUM_STEPS + 1, "loss": 0.5, "lr": 1e-3}])
        (big / "train.log").write_text("12:00:00 run started\n12:00:05 step 100001\n")
        _checkpoint(big, "step_100001", NUM_STEPS + 1)
        wait_js(page, f"document.getElementById('status').textContent.startsWith('step {NUM_STEPS + 1}')")
        wait_js(page, "document.getElementById('log').textContent.includes('step 100001')")
        wait_js(page, "document.getElementById('checkpoints').textContent.includes('step_100001')")

        # A resume cut the file back to step 20 and redid step 21: the page starts over, no reload.
        (big / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(20, 10, 10.0)))
        _append(big / "metrics.jsonl", [{"kind": "event", "step": 20, "message": "resumed from step 20"},
                                        {"kind": "train", "step": 21, "loss": 4.0, "lr": 1e-3}])
        wait_js(page, "document.getElementById('status').textContent.startsWith('step 21')")
        assert page.evaluate(f"() => {TRACES}[0].x") == list(range(1, 22))
        assert page.evaluate(f"() => {TRACES}[2].x") == [10, 20]
        assert page.inner_text("#events").startswith("step 20: resumed from step 20")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard-overlay.png"), full_page=True)
        browser.close()
    wait_for(lambda: (ARTIFACTS / "dashboard-overlay.png").stat().st_size > 10_000)
