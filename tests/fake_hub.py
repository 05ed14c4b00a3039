"""A fake Hugging Face Hub and plain file server on 127.0.0.1, so download tests never touch the network.

It answers what huggingface_hub 2.x asks for in `hf_hub_download`, `list_repo_files` and `repo_info`.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

REPO_TYPES = {"datasets": "dataset", "spaces": "space", "models": "model"}


class FakeHub:
    """`with FakeHub({"datasets/owner/name/a.txt": b"..."}, commit="ab" * 20) as hub: hub.url`.

    A key is `[datasets/|spaces/]owner/name/path/in/repo` (no prefix: a model); every key is also served as a
    plain URL `/{key}`. Files are LFS-like (X-Linked-Etag = sha256) unless their key is in `non_lfs`.
    The revisions served are `commit` and the branch names in `branches`; `page_size` paginates tree listings.
    """

    def __init__(self, files: dict[str, bytes], *, commit: str = "c0ffee" * 6 + "beef",
                 branches: tuple[str, ...] = ("main",), non_lfs: tuple[str, ...] = (), page_size: int = 1000):
        self.files = dict(files)
        self.commit = commit
        self.branches = branches
        self.non_lfs = set(non_lfs)
        self.page_size = page_size
        self.is_ignoring_ranges = False  # True: answer 200 with the whole file, as some servers do
        self.corrupted: set[str] = set()  # file paths whose bytes no longer match the sha256 their headers publish
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path with query, Range header)
        self._drops: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        # A short poll keeps shutdown() (one poll interval) from adding half a second to every test.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def drop_after(self, path: str, num_bytes: int) -> None:
        """The next GET of `path` sends headers for the full length, then closes after `num_bytes` of body."""
        with self._lock:
            self._drops[path] = num_bytes

    def take_drop(self, path: str) -> int | None:
        with self._lock:
            return self._drops.pop(path, None)

    def resolve_path(self, key: str, revision: str = "main") -> str:
        """The URL path huggingface_hub requests for `key` at `revision`."""
        repo_type, repo_id, path = split_key(key)
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        return f"/{prefix}{repo_id}/resolve/{quote(revision, safe='')}/{quote(path)}"

    def env(self, hf_home: Path, *, is_offline: bool = False) -> dict[str, str]:
        """Environment for a subprocess whose huggingface_hub talks only to this server (it reads it at import)."""
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and not k.startswith("HF_")}
        return env | {
            "HF_ENDPOINT": self.url, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1" if is_offline else "0",
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1", "NO_PROXY": "127.0.0.1,localhost",
        }

    def repo(self, repo_type: str, repo_id: str) -> dict[str, bytes] | None:
        """The files of one repo keyed by path in the repo, or None if no key belongs to it."""
        found = {}
        for key, data in self.files.items():
            key_type, key_repo, path = split_key(key)
            if (key_type, key_repo) == (repo_type, repo_id):
                found[path] = data
        return found or None

    def is_lfs(self, repo_type: str, repo_id: str, path: str) -> bool:
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        return f"{prefix}{repo_id}/{path}" not in self.non_lfs


def split_key(key: str) -> tuple[str, str, str]:
    """`datasets/owner/name/a/b.txt` -> ("dataset", "owner/name", "a/b.txt")."""
    parts = key.split("/")
    repo_type = REPO_TYPES.get(parts[0], "model")
    if repo_type != "model" or parts[0] == "models":
        parts = parts[1:]
    return repo_type, "/".join(parts[:2]), "/".join(parts[2:])


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def call(env: dict[str, str], function: str, *args, **kwargs) -> dict:
    """Run `module:function(*args, **kwargs)` in a fresh interpreter: {"result": str} or {"error": UserError text}."""
    code = (
        "import importlib, json, sys\n"
        "from gptrain.errors import UserError\n"
        "module, name = sys.argv[1].split(':')\n"
        "args, kwargs = json.loads(sys.argv[2])\n"
        "try:\n"
        "    result = getattr(importlib.import_module(module), name)(*args, **kwargs)\n"
        "except UserError as e:\n"
        "    print(json.dumps({'error': str(e)}))\n"
        "else:\n"
        "    print(json.dumps({'result': result if isinstance(result, (list, type(None))) else str(result)}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, function, json.dumps([args, kwargs])],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _make_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        pass

    Handler.hub = hub
    return Handler


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real Hub; every answer carries a Content-Length
    hub: FakeHub

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self._route()

    do_HEAD = do_GET  # _send leaves the body out for HEAD

    def _route(self) -> None:
        self.hub.requests.append((self.command, self.path, self.headers.get("Range")))
        url = urlsplit(self.path)
        if url.path.startswith("/api/"):
            return self._api([unquote(p) for p in url.path.split("/")[2:]], parse_qs(url.query))
        if "/resolve/" in url.path:
            return self._resolve(url.path)
        data = self.hub.files.get(unquote(url.path).lstrip("/"))
        if data is None:
            return self._send(404, b"not found", {})
        self._send_file(data, {"ETag": f'"{git_blob_sha1(data)}"'})

    def _resolve(self, raw_path: str) -> None:
        left, right = raw_path.lstrip("/").split("/resolve/", 1)
        revision, _, file_path = right.partition("/")
        repo_type, repo_id, _ = split_key(left + "/x")
        files, error = self._repo_at(repo_type, repo_id, unquote(revision))
        if error:
            return self._send(404, b"", error)
        data = files.get(unquote(file_path))
        headers = {"X-Repo-Commit": self.hub.commit}
        if data is None:
            return self._send(404, b"", headers | {"X-Error-Code": "EntryNotFound"})
        headers["ETag"] = f'"{git_blob_sha1(data)}"'
        if self.hub.is_lfs(repo_type, repo_id, unquote(file_path)):
            sha256 = hashlib.sha256(data).hexdigest()
            headers |= {"ETag": f'"{sha256}"', "X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(len(data))}
        if unquote(file_path) in self.hub.corrupted:
            data = data[:-1] + bytes([data[-1] ^ 1])
        self._send_file(data, headers)

    def _repo_at(self, repo_type: str, repo_id: str, revision: str) -> tuple[dict[str, bytes], dict[str, str]]:
        files = self.hub.repo(repo_type, repo_id)
        if files is None:
            return {}, {"X-Error-Code": "RepoNotFound"}
        if revision not in (self.hub.commit, *self.hub.branches):
            return {}, {"X-Error-Code": "RevisionNotFound"}
        return files, {}

    def _api(self, segments: list[str], query: dict[str, list[str]]) -> None:
        """GET /api/{type}s/{owner}/{name}[/revision/{rev} | /tree/{rev}[/{folder}]]."""
        kind, parts = segments[0], segments[1:]
        repo_type, repo_id = REPO_TYPES.get(kind), "/".join(parts[:2])
        action, revision = (parts[2], parts[3]) if len(parts) >= 4 else ("revision", "main")
        files, error = self._repo_at(repo_type, repo_id, revision) if repo_type else ({}, {"X-Error-Code": "x"})
        if error:
            return self._send(404, b"{}", error)
        if action == "revision":
            info = {"id": repo_id, "sha": self.hub.commit, "siblings": [{"rfilename": p} for p in sorted(files)]}
            return self._send_json(info, {})
        if action == "tree":
            return self._tree(repo_type, repo_id, files, "/".join(parts[4:]), query)
        self._send(404, b"{}", {})

    def _tree(self, repo_type: str, repo_id: str, files: dict[str, bytes], folder: str,
              query: dict[str, list[str]]) -> None:
        """GET /api/{type}s/{repo}/tree/{rev}[/{folder}]?recursive=..&cursor=..: a page of entries, Link: next."""
        entries = _tree_entries(self.hub, repo_type, repo_id, files, folder,
                                is_recursive=query.get("recursive", ["False"])[0].lower() == "true")
        start = int(query.get("cursor", ["0"])[0])
        page = entries[start:start + self.hub.page_size]
        headers = {}
        if start + self.hub.page_size < len(entries):
            base = self.path.split("?")[0]
            next_url = f"{self.hub.url}{base}?recursive={query.get('recursive', ['False'])[0]}" \
                       f"&cursor={start + self.hub.page_size}"
            headers["Link"] = f'<{next_url}>; rel="next"'
        self._send_json(page, headers)

    def _send_file(self, data: bytes, headers: dict[str, str]) -> None:
        range_header = None if self.hub.is_ignoring_ranges else self.headers.get("Range")
        status, body, headers = _ranged(data, range_header, headers | {"Accept-Ranges": "bytes"})
        drop = self.hub.take_drop(urlsplit(self.path).path) if self.command == "GET" else None
        if drop is None:
            return self._send(status, body, headers)
        self._send(status, body[:drop], headers | {"Content-Length": str(len(body))})
        self.close_connection = True

    def _send_json(self, value, headers: dict[str, str]) -> None:
        self._send(200, json.dumps(value).encode(), headers | {"Content-Type": "application/json"})

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        headers = {"Content-Length": str(len(body))} | headers
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def _ranged(data: bytes, range_header: str | None, headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
    """(status, body, headers) for an optional `Range: bytes=a-[b]` request."""
    if not range_header or not range_header.startswith("bytes="):
        return 200, data, headers
    first, _, last = range_header[len("bytes="):].partition("-")
    start, end = int(first), int(last) if last else len(data) - 1
    if start >= len(data):
        return 416, b"", headers | {"Content-Range": f"bytes */{len(data)}"}
    end = min(end, len(data) - 1)
    return 206, data[start:end + 1], headers | {"Content-Range": f"bytes {start}-{end}/{len(data)}"}


def _tree_entries(hub: FakeHub, repo_type: str, repo_id: str, files: dict[str, bytes], folder: str,
                  *, is_recursive: bool) -> list[dict]:
    """Entries as the Hub's tree API returns them: files with oid/size (and lfs), directories, sorted by path."""
    prefix = f"{folder}/" if folder else ""
    entries: dict[str, dict] = {}
    for path, data in files.items():
        if not path.startswith(prefix):
            continue
        rest = path[len(prefix):].split("/")
        depth = len(rest) if is_recursive else 1
        for i in range(1, min(depth, len(rest) - 1) + 1):
            directory = prefix + "/".join(rest[:i])
            entries[directory] = {"type": "directory", "oid": git_blob_sha1(directory.encode()), "size": 0,
                                  "path": directory}
        if is_recursive or len(rest) == 1:
            entry = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}
            if hub.is_lfs(repo_type, repo_id, path):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries[path] = entry
    return [entries[p] for p in sorted(entries)]
