"""Progress of a data preparation: a live bar on a terminal (bytes, tokens/s, ETA), plain lines elsewhere."""

from __future__ import annotations

import sys
import time

PLAIN_EVERY_SECONDS = 10.0


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class PrepareProgress:
    """Call update(bytes, tokens) as input is consumed; close() when done."""

    def __init__(self, total_bytes: int, label: str, log=print, is_live: bool | None = None) -> None:
        self.total_bytes, self.label, self.log = max(1, total_bytes), label, log
        self.num_bytes, self.num_tokens = 0, 0
        self.started = self._last_line = time.monotonic()
        is_live = sys.stdout.isatty() and log is print if is_live is None else is_live
        self._bar = self._task = None
        if is_live:
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

            # Refreshed from update(), not by rich's own thread: the preparation then runs one thread,
            # which lets its tokenizer workers start by fork.
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), transient=True,
                                 auto_refresh=False)
            self._task = self._bar.add_task(label, total=self.total_bytes, rate="")
            self._bar.start()

    def rate(self) -> float:
        return self.num_tokens / max(1e-9, time.monotonic() - self.started)

    def update(self, num_bytes: int, num_tokens: int) -> None:
        self.num_bytes += num_bytes
        self.num_tokens += num_tokens
        now = time.monotonic()
        if self._bar is not None:
            self._bar.update(self._task, completed=min(self.num_bytes, self.total_bytes),
                             rate=f"{self.num_tokens / 1e6:,.1f}M tokens, {self.rate() / 1e6:.2f}M tokens/s")
            if now - self._last_line >= 0.2:
                self._last_line = now
                self._bar.refresh()
            return
        if now - self._last_line >= PLAIN_EVERY_SECONDS:
            self._last_line = now
            done = min(1.0, self.num_bytes / self.total_bytes)
            eta = (now - self.started) * (1 - done) / done if done > 0 else 0.0
            self.log(f"{self.label}: {done:.0%} of {self.total_bytes / 1e6:,.0f} MB, {self.num_tokens:,} tokens, "
                     f"{self.rate() / 1e6:.2f}M tokens/s, ETA {_duration(eta)}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
