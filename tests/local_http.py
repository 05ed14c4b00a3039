"""A static file server on 127.0.0.1 for download tests; its threads are all gone when it closes."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = False  # server_close() then joins every request thread
    block_on_close = True


@contextlib.contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    """The base URL (http://127.0.0.1:PORT) of a server for directory's files, while the block runs."""
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(directory), **k)  # noqa: E731
    server = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
