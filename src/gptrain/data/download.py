"""Downloads for the data catalogue: Hub files through huggingface_hub's cache, plain URLs resumably.

huggingface_hub is imported inside the functions, so importing this module stays light.
"""

from __future__ import annotations

import fnmatch
import hashlib
import http.client
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from gptrain.errors import UserError
from gptrain.files import fsync_dir, fsync_file

CHUNK_BYTES = 1 << 20
TIMEOUT_SECONDS = 60.0
PROGRESS_SECONDS = 5.0
_SHA256 = re.compile(r"[0-9a-f]{64}")
_COMMIT = re.compile(r"[0-9a-f]{40}")


@contextmanager
def _quiet_hub():
    """huggingface_hub logs a warning per retry when the Hub is unreachable; the UserError says it once."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def hub_file(repo_id: str, filename: str, *, revision: str, repo_type: str = "dataset",
             size: int | None = None, sha256: str | None = None) -> Path:
    """Local path of one Hub file (HF cache, HF_ENDPOINT, HF_HUB_OFFLINE honoured), verified when size/sha256 given."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    where = f"{repo_id}/{filename}@{revision}"
    cached = try_to_load_from_cache(repo_id, filename, revision=revision, repo_type=repo_type)
    # huggingface_hub 2.4 resumes a dropped connection within this call (a Range request from the 10 MiB chunks
    # it has), but deletes its partial file when the call fails (huggingface_hub PR 4228): no resume across calls.
    try:
        with _quiet_hub():
            path = Path(hf_hub_download(repo_id, filename, revision=revision, repo_type=repo_type))
    except _hub_errors() as e:
        raise UserError(_describe(e, where)) from None
    is_fresh = not (isinstance(cached, str) and Path(cached).resolve() == path.resolve())
    _verify_hub_file(path, where, size=size, sha256=sha256, is_fresh=is_fresh)
    return path


def _verify_hub_file(path: Path, where: str, *, size: int | None, sha256: str | None, is_fresh: bool) -> None:
    blob = path.resolve()
    if size is not None and blob.stat().st_size != size:
        raise UserError(f"{where} has {blob.stat().st_size} bytes, not the {size} the catalogue expects; "
                        f"the Hub file changed or the catalogue entry is wrong")
    # The cache names an LFS blob by the sha256 the Hub reported (its ETag), so a different file shows without a read.
    is_named_by_sha256 = _SHA256.fullmatch(blob.name) is not None
    if sha256 is not None and is_named_by_sha256 and blob.name != sha256:
        raise UserError(f"{where} has sha256 {blob.name}, not the {sha256} the catalogue expects; "
                        f"pin the catalogue to the revision it was written for")
    expected = sha256 or (blob.name if is_named_by_sha256 else None)  # else the hash the Hub publishes
    if expected is None:
        return
    # huggingface_hub 2.4 checks only the byte count of a plain HTTP download, never the hash, so the bytes
    # are hashed once when they arrive; a blob that fails is deleted, so one still in the cache passed.
    if is_fresh or not is_named_by_sha256:
        actual = sha256_of(blob)
        if actual != expected:
            blob.unlink(missing_ok=True)
            path.unlink(missing_ok=True)
            raise UserError(f"{where} arrived with sha256 {actual}, not {expected}; it was removed, run again to retry")


def hub_list(repo_id: str, pattern: str, *, revision: str, repo_type: str = "dataset") -> list[str]:
    """Sorted repo paths at `revision` matching the glob `pattern` (fnmatch: `*` also crosses `/`).

    Offline or unreachable, the listing is what the local cache holds for that revision, which may be a subset.
    """
    from huggingface_hub import HfApi

    where = f"{repo_id}@{revision}"
    try:
        with _quiet_hub():
            files = HfApi().list_repo_files(repo_id, revision=revision, repo_type=repo_type)
    except _hub_errors() as e:
        files = _cached_files(repo_id, revision, repo_type) if _is_unreachable(e) else None
        if files is None:
            raise UserError(_describe(e, where)) from None
    return sorted(f for f in files if fnmatch.fnmatchcase(f, pattern))


def hub_commit(repo_id: str, revision: str, repo_type: str = "dataset") -> str | None:
    """The commit sha `revision` resolves to (Hub, else the cache's refs/), for metadata; None if unknown offline."""
    from huggingface_hub import HfApi

    if _COMMIT.fullmatch(revision):
        return revision
    try:
        return HfApi().repo_info(repo_id, revision=revision, repo_type=repo_type).sha
    except _hub_errors() as e:
        if not _is_unreachable(e):
            raise UserError(_describe(e, f"{repo_id}@{revision}")) from None
        return _cached_commit(_repo_cache(repo_id, repo_type), revision)


def _repo_cache(repo_id: str, repo_type: str) -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{repo_id.replace('/', '--')}"


def _cached_commit(repo_cache: Path, revision: str) -> str | None:
    if _COMMIT.fullmatch(revision):
        return revision
    ref = repo_cache / "refs" / revision
    return ref.read_text().strip() if ref.is_file() else None


def _cached_files(repo_id: str, revision: str, repo_type: str) -> list[str] | None:
    repo_cache = _repo_cache(repo_id, repo_type)
    commit = _cached_commit(repo_cache, revision)
    snapshot = repo_cache / "snapshots" / (commit or "")
    if commit is None or not snapshot.is_dir():
        return None
    return [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]


def _hub_errors() -> tuple[type[BaseException], ...]:
    import httpx2  # huggingface_hub's HTTP client; its transport errors are not OSErrors

    return OSError, httpx2.HTTPError


def _is_unreachable(error: BaseException) -> bool:
    import httpx2
    from huggingface_hub.errors import OfflineModeIsEnabled

    return isinstance(error, (OfflineModeIsEnabled, httpx2.TransportError))


def _describe(error: BaseException, where: str) -> str:
    """One line for a huggingface_hub error: what went wrong with `where` and what to do."""
    from huggingface_hub import constants
    from huggingface_hub import errors as hf

    if isinstance(error, hf.RepositoryNotFoundError):
        return f"{where}: no such repository on {constants.ENDPOINT} (or it is gated: log in with `hf auth login`)"
    if isinstance(error, hf.RevisionNotFoundError):
        return f"{where}: no such revision on {constants.ENDPOINT}; check the catalogue's revision"
    if isinstance(error, hf.RemoteEntryNotFoundError):
        return f"{where}: no such file at that revision on {constants.ENDPOINT}; check the file name"
    if constants.is_offline_mode():
        return f"{where} is not in the cache {constants.HF_HUB_CACHE} and HF_HUB_OFFLINE=1; unset it to reach the Hub"
    if isinstance(error, hf.HfHubHTTPError) and error.response is not None:
        return f"{where}: {constants.ENDPOINT} answered HTTP {error.response.status_code}; try again later"
    if isinstance(error, hf.LocalEntryNotFoundError):
        return f"{where}: cannot reach {constants.ENDPOINT} and it is not cached; check the network or HF_ENDPOINT"
    detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f"{where}: the Hub request failed ({detail}); check the network and run again"


def http_file(url: str, *, cache_dir: Path, size: int | None = None, sha256: str | None = None,
              log: Callable[[str], object] = print) -> Path:
    """Path of `url` downloaded to <cache_dir>/<12 hex of sha256(url)>/<basename>, resuming a `.part` file."""
    name = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name or "download"
    target = Path(cache_dir) / hashlib.sha256(url.encode()).hexdigest()[:12] / name
    if target.is_file() and (size is None or target.stat().st_size == size):
        return target
    if os.environ.get("GPTRAIN_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise UserError(f"{url} is not in {target.parent} and GPTRAIN_OFFLINE is set; unset it to download")
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(name + ".part")
    try:
        _fetch(url, part, log)
    except urllib.error.HTTPError as e:
        raise UserError(f"{url}: the server answered HTTP {e.code} {e.reason}; check the address") from None
    except (OSError, http.client.HTTPException) as e:
        got = part.stat().st_size if part.exists() else 0
        raise UserError(f"{url}: download stopped at {got} bytes ({e}); run again to resume") from None
    if problem := _mismatch(part, size, sha256):
        part.unlink()
        raise UserError(f"{url}: {problem}; the partial file was removed, check the catalogue entry")
    fsync_file(part)  # _fetch synced what it wrote; a part already whole (HTTP 416) is from an earlier process
    os.replace(part, target)
    fsync_dir(target.parent)
    return target


def _fetch(url: str, part: Path, log: Callable[[str], object]) -> None:
    """Append the rest of `url` to `part` (a `Range` request), or rewrite it when the server ignores ranges."""
    start = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:  # the part is already whole (stopped before its rename); the checks decide
            return
        raise
    with response, open(part, "ab" if start and response.status == 206 else "wb") as f:
        done = f.tell()
        length = response.headers.get("Content-Length")
        total = done + int(length) if length is not None else None
        log(f"downloading {url}" + (f" from byte {done}" if done else ""))
        done = _copy(response, f, done, total, log)
        f.flush()
        os.fsync(f.fileno())
    if total is not None and done != total:
        raise ConnectionError(f"the connection closed after {done} of {total} bytes")


def _copy(response: http.client.HTTPResponse, f: BinaryIO, done: int, total: int | None,
          log: Callable[[str], object]) -> int:
    started = last = time.monotonic()
    first = done
    while chunk := response.read(CHUNK_BYTES):
        f.write(chunk)
        done += len(chunk)
        if (now := time.monotonic()) - last >= PROGRESS_SECONDS:
            last = now
            of = f" of {total / 1e6:.1f}" if total is not None else ""
            rate = (done - first) / 1e6 / max(now - started, 1e-6)
            log(f"  {done / 1e6:.1f}{of} MB, {rate:.1f} MB/s")
    return done


def _mismatch(path: Path, size: int | None, sha256: str | None) -> str | None:
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        return f"got {actual_size} bytes, expected {size}"
    if sha256 is not None and (actual := sha256_of(path)) != sha256:
        return f"got sha256 {actual}, expected {sha256}"
    return None


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (shards are GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
