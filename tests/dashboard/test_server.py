"""The dashboard's API: the token, Host and Origin checks, incremental rows (also after a cut-back), the page
shell, controls through a live trainer lock, and the prompt box."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi", reason="the dashboard extra is not installed")
from fastapi.testclient import TestClient  # noqa: E402

from gptrain.dashboard.runs import read_rows_from, thin  # noqa: E402
from gptrain.dashboard.server import create_app  # noqa: E402

TOKEN = "secret-token"


def _run(tmp_path, rows):
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    (run / "config.toml").write_text("name = \"x\"\n")
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def _client(run, host="127.0.0.1"):
    return TestClient(create_app([run], TOKEN, {"127.0.0.1", "localhost"}), base_url=f"http://{host}:8765")


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_every_api_request_needs_the_token_and_a_known_host(tmp_path):
    client = _client(_run(tmp_path, [{"kind": "train", "step": 1, "loss": 2.0}]))
    assert client.get("/api/runs").status_code == 401
    assert client.get("/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/runs", headers=AUTH).json()[0]["name"] == "run"
    page = client.get("/")
    assert page.status_code == 200 and TOKEN not in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/static/plotly.min.js").status_code == 200  # served from the plotly wheel
    assert _client(tmp_path / "run", host="evil.example").get("/api/runs", headers=AUTH).status_code == 400
    foreign = client.post("/api/control", headers=AUTH | {"Origin": "http://evil.example"}, json={"command": "stop"})
    assert foreign.status_code == 403 and not (tmp_path / "run" / "control.jsonl").exists()
    refused = client.post("/api/control", headers=AUTH, json={"command": "pause"})  # no trainer holds the run
    assert refused.status_code == 409 and "no trainer is running" in refused.json()["detail"]


def test_rows_come_incrementally_and_start_over_after_a_cut_back(tmp_path):
    rows = [{"kind": "train", "step": i, "loss": 1.0} for i in range(1, 6)]
    run = _run(tmp_path, rows)
    client = _client(run)
    first = client.get("/api/rows", headers=AUTH).json()
    assert [r["step"] for r in first["rows"]] == [1, 2, 3, 4, 5] and not first["reset"]
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "sample", "step": 5, "text": "<script>alert(1)</script>"}) + "\n{\"kind\": ")
    more = client.get(f"/api/rows?offset={first['offset']}", headers=AUTH).json()
    assert [r["kind"] for r in more["rows"]] == ["sample"]  # the half-written line waits
    (run / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n")  # a resume cut the file back
    again = client.get(f"/api/rows?offset={more['offset']}", headers=AUTH).json()
    assert again["reset"] and [r["step"] for r in again["rows"]] == [1]


def test_a_big_file_is_thinned_for_drawing_but_keeps_every_val_row(tmp_path):
    rows = [{"kind": "train", "step": i, "loss": 1.0} for i in range(1, 100_001)]
    rows += [{"kind": "val", "step": i, "val_loss": 1.0} for i in range(100, 100_001, 100)]
    run = _run(tmp_path, rows)
    found, _, _ = read_rows_from(run / "metrics.jsonl", 0)
    drawn = thin(found)
    train = [r for r in drawn if r["kind"] == "train"]
    assert len(train) <= 2001 and train[-1]["step"] == 100_000 and sum(r["kind"] == "val" for r in drawn) == 1000


def test_the_prompt_box_samples_from_the_latest_checkpoint(tmp_path, corpus_dir):
    from gptrain.config import resolve_config
    from gptrain.train.loop import train

    cfg = resolve_config(None, {"data.source": str(corpus_dir), "data.data_dir": str(tmp_path / "ds"),
                                "tokenizer.kind": "char", "embd": 16, "layers": 1, "heads": 1, "context": 16,
                                "steps": 5, "log.is_quiet": True, "samples.num_tokens": 4,
                                "run_dir": str(tmp_path / "trained")}, environ={})
    train(cfg, log=lambda *_: None)
    client = _client(tmp_path / "trained")
    answer = client.post("/api/generate", headers=AUTH, json={"prompt": "KING", "max_tokens": 12, "top_k": 5})
    assert answer.status_code == 200 and answer.text and not answer.text.startswith("[")  # "[...]": an error


def test_train_dashboard_serves_the_run_in_its_own_process_for_as_long_as_it_trains(tmp_path, corpus_dir,
                                                                                     monkeypatch):
    import gptrain.cli_eval as cli_eval
    from gptrain.cli import main

    started = []

    class FakeServer:
        def __init__(self, cmd):
            started.append({"cmd": cmd, "is_running": True})

        def terminate(self):
            started[-1]["is_running"] = False

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(cli_eval.subprocess, "Popen", FakeServer)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", str(corpus_dir), "--tokenizer", "char", "--embd", "16", "--layers", "1",
                 "--heads", "1", "--context", "16", "--steps", "3", "--quiet", "--serve-metrics",
                 "--metrics-addr", "127.0.0.1:9123", "--samples.num_tokens", "4"]) == 0
    (server,) = started
    run_dir = server["cmd"][server["cmd"].index("dashboard") + 1]
    assert server["cmd"][-5:] == ["--host", "127.0.0.1", "--port", "9123", "--new-run"] and not server["is_running"]
    assert (tmp_path / run_dir / "metrics.jsonl").is_file()  # the run the dashboard was started for
    assert main(["train", "--metrics-addr", "nonsense"]) == 2
    (tmp_path / ".env").write_text("METRICS_SERVER_ADDR=localhost:9124\n")  # other trainers' key turns it on
    assert main(["train", "--data", str(corpus_dir), "--tokenizer", "char", "--embd", "16", "--layers", "1",
                 "--heads", "1", "--context", "16", "--steps", "2", "--quiet", "--run-dir", "second"]) == 0
    assert started[-1]["cmd"][-5:] == ["--host", "localhost", "--port", "9124", "--new-run"]


def test_the_dashboard_binds_loopback_unless_told_otherwise(tmp_path, monkeypatch, capsys):
    import uvicorn

    from gptrain.cli import main

    run = _run(tmp_path, [])
    bound = []
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, log_level: bound.append((host, port)))
    assert main(["dashboard", str(run)]) == 0
    out = capsys.readouterr().out
    assert bound == [("127.0.0.1", 8765)] and "http://127.0.0.1:8765/#token=" in out and "warning" not in out
    assert main(["dashboard", str(run), "--host", "0.0.0.0", "--port", "9000"]) == 0
    assert bound[-1] == ("0.0.0.0", 9000) and "warning: binding 0.0.0.0" in capsys.readouterr().out


def test_metrics_server_addr_in_dotenv_is_loopback_only(tmp_path, monkeypatch, capsys):
    from gptrain.cli_eval import dotenv_metrics_addr

    env = tmp_path / ".env"
    assert dotenv_metrics_addr(env) is None
    env.write_text("METRICS_SERVER_ADDR=127.0.0.1:9200\n")
    assert dotenv_metrics_addr(env) == "127.0.0.1:9200"
    env.write_text("METRICS_SERVER_ADDR=[::1]:9200\n")
    assert dotenv_metrics_addr(env) == "[::1]:9200"
    env.write_text("METRICS_SERVER_ADDR=0.0.0.0:9200\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("METRICS_SERVER_ADDR", "127.0.0.1:9300")  # never read from the process environment
    from gptrain.cli import main

    assert main(["train", "--steps", "1"]) == 2
    assert "METRICS_SERVER_ADDR in .env must be a loopback address" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # refused before anything was written
