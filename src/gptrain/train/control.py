"""Steering a running trainer through its run directory: commands in control.jsonl, acknowledgements
in control_acks.jsonl, and the trainer lock.

A viewer (`gptrain control`, the dashboard) appends `{"id", "command", "value"}` lines to control.jsonl.
Rank 0 reads new lines at step boundaries; when there are any, every rank receives them in one
broadcast and applies them at the same step, and rank 0 writes an acknowledgement row for each id
to control_acks.jsonl (never cut back on resume, unlike metrics.jsonl). Replay after a crash: ids
already acknowledged are never applied afresh; a state command (lr_scale, eval_every, sample_every)
acknowledged after the checkpoint the run resumed from is applied again at its recorded step, and a
one-off command (pause, resume, save, stop) is not.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from gptrain.errors import UserError
from gptrain.metrics.sinks import parse_rows

CONTROL_FILE, ACKS_FILE, LOCK_FILE = "control.jsonl", "control_acks.jsonl", ".trainer.lock"
STATE_COMMANDS = {"lr_scale": float, "eval_every": int, "sample_every": int}  # kept in TrainState
ONE_OFF_COMMANDS = ("pause", "resume", "save", "stop")
PAUSE_POLL_SECONDS = 0.5


def check_command(raw: object) -> dict:
    """A command line's dict with its value typed, or a UserError saying what is wrong with it."""
    if not isinstance(raw, dict) or not isinstance(raw.get("id"), str) or not raw["id"]:
        raise UserError("a control command is a JSON object with a non-empty string id")
    name = raw.get("command")
    if name in ONE_OFF_COMMANDS:
        return {"id": raw["id"], "command": name}
    if name not in STATE_COMMANDS:
        raise UserError(f"unknown control command {name!r} (known: {', '.join([*ONE_OFF_COMMANDS, *STATE_COMMANDS])})")
    try:
        value = float(raw.get("value"))
    except (TypeError, ValueError):
        raise UserError(f"{name} needs a number (got {raw.get('value')!r})") from None
    if STATE_COMMANDS[name] is int:
        if value != value or value in (float("inf"), float("-inf")) or value != int(value):
            raise UserError(f"{name} needs a whole number of steps (got {raw.get('value')!r})")
        value = int(value)
    if not (value > 0 if name == "lr_scale" else value >= 0) or value != value or value == float("inf"):
        raise UserError(f"{name} must be {'> 0' if name == 'lr_scale' else '>= 0'} and finite (got {value})")
    return {"id": raw["id"], "command": name, "value": value}


@dataclass
class ControlReader:
    """Rank 0's reader of control.jsonl: new whole lines since the last poll, ids not yet acknowledged."""

    run_dir: Path
    offset: int = 0
    acked: dict[str, dict] = field(default_factory=dict)  # id -> its acknowledgement row

    @classmethod
    def open(cls, run_dir: Path) -> ControlReader:
        reader = cls(run_dir)
        for row in _read_rows(run_dir / ACKS_FILE):
            if isinstance(row.get("id"), str):
                reader.acked[row["id"]] = row
        return reader

    def replays(self, resumed_step: int) -> list[dict]:
        """State commands acknowledged after the checkpoint, to apply again at their steps."""
        return [dict(row, is_replay=True) for row in self.acked.values()
                if row.get("command") in STATE_COMMANDS and row.get("step", 0) > resumed_step and row.get("ok")]

    def poll(self) -> list[dict]:
        """New commands (malformed lines as {"id", "error"}), skipping ids already acknowledged."""
        path = self.run_dir / CONTROL_FILE
        if not path.is_file() or path.stat().st_size <= self.offset:
            return []
        with open(path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        whole = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next poll
        self.offset += len(whole)
        commands = []
        for line in whole.decode("utf-8", errors="replace").splitlines():
            if line.strip():
                command = _parse(line)
                if command.get("id") is None or command["id"] not in self.acked:
                    commands.append(command)
        return commands

    def acknowledge(self, command: dict, step: int, message: str, is_ok: bool = True) -> dict:
        row = {"id": command.get("id"), "command": command.get("command"), "value": command.get("value"),
               "step": step, "time": time.time(), "ok": is_ok, "message": message}
        if row["id"] is not None:
            self.acked[row["id"]] = row
        with open(self.run_dir / ACKS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        return row


def _parse(line: str) -> dict:
    """A checked command, or {"id" (when there is one), "error"} for a line that is not one."""
    try:
        raw = json.loads(line)
    except json.JSONDecodeError:
        return {"id": None, "error": "a control line is not JSON"}
    try:
        return check_command(raw)
    except UserError as e:
        raw_id = raw.get("id") if isinstance(raw, dict) else None
        return {"id": raw_id if isinstance(raw_id, str) else None, "error": str(e)}


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        return parse_rows(f)[0]


class TrainerLock:
    """An exclusive lock on <run_dir>/.trainer.lock, held by the training process while it runs: one
    trainer per run directory, and viewers can tell whether a trainer is there to obey commands."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise UserError(f"another gptrain process is training in {self.path.parent}: wait for it to end "
                            "or choose another --run-dir") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def is_trainer_running(run_dir: Path) -> bool:
    """Whether a trainer holds the run's lock (a lock nobody holds can be taken: then nobody is there)."""
    path = run_dir / LOCK_FILE
    if not path.is_file():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def send_command(run_dir: Path, name: str, value: float | None = None, timeout_seconds: float = 60.0) -> dict:
    """Queue a command for the run's trainer and wait for its acknowledgement row (what `gptrain control`
    and the dashboard do); a UserError when no trainer holds the run, the command is bad, or no answer comes."""
    if not (run_dir / "config.toml").is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.toml in it)")
    if not 0 < timeout_seconds < float("inf"):
        raise UserError(f"the timeout must be a positive number of seconds (got {timeout_seconds})")
    command = check_command({"id": uuid.uuid4().hex, "command": name, "value": value})
    if not is_trainer_running(run_dir):
        raise UserError(f"no trainer is running in {run_dir}: commands go to a live `gptrain train` (start or "
                        "resume the run first)")
    line = (json.dumps(command) + "\n").encode()
    fd = os.open(run_dir / CONTROL_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)  # one write of one line: O_APPEND keeps concurrent senders' lines whole
    finally:
        os.close(fd)
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        for row in _read_rows(run_dir / ACKS_FILE):
            if row.get("id") == command["id"]:
                return row
        time.sleep(0.1)
    raise UserError(f"the trainer did not answer within {timeout_seconds:.0f}s (commands are applied between "
                    "steps, so a long step or evaluation delays them); the command stays queued")
