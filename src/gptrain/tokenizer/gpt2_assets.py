"""The GPT-2 BPE ranks file (`gpt2.tiktoken`, identical to tiktoken's r50k_base): find, fetch, verify.

Run as `python -m gptrain.tokenizer.gpt2_assets` (the setup script does) to place it in the cache.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from gptrain.errors import UserError
from gptrain.files import write_atomic

FILE_NAME = "gpt2.tiktoken"
SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
# openai-whisper's sdist (MIT) ships the same bytes under whisper/assets/; PyPI is reachable where
# the blob store is not.
WHISPER_SDIST = "openai-whisper==20250625"


def cache_dir() -> Path:
    return Path(os.environ.get("GPTRAIN_CACHE", Path.home() / ".cache" / "gptrain"))


def _is_valid(data: bytes) -> bool:
    return hashlib.sha256(data).hexdigest() == SHA256


def _install(data: bytes, source: str) -> Path:
    if not _is_valid(data):
        raise UserError(f"the GPT-2 encoding from {source} has the wrong SHA-256; not using it")
    target = cache_dir() / FILE_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, data)
    return target


def download(url: str | None = None, timeout_seconds: float = 30.0) -> Path:
    """Fetch the ranks file over HTTP(S) (GPTRAIN_GPT2_URL overrides the address), verify, cache."""
    url = url or os.environ.get("GPTRAIN_GPT2_URL", URL)
    try:
        with urllib.request.urlopen(url, timeout=timeout_seconds) as response:
            data = response.read()
    except OSError as e:
        raise UserError(
            f"could not download the GPT-2 encoding from {url} ({e}); run `bash scripts/setup.sh` "
            f"or put {FILE_NAME} in {cache_dir()}"
        ) from None
    return _install(data, url)


def fetch_from_pypi() -> Path:
    """Take the ranks file out of the openai-whisper sdist fetched with pip (no install)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*cmd, "-d", tmp, WHISPER_SDIST], check=True)
        sdist = next(Path(tmp).glob("*.tar.gz"))
        with tarfile.open(sdist) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith(f"whisper/assets/{FILE_NAME}"))
            data = tar.extractfile(member).read()
    return _install(data, WHISPER_SDIST)


def encoding_path(should_download: bool = True) -> Path:
    """Path of a verified ranks file, downloading it first if it is missing and allowed."""
    path = cache_dir() / FILE_NAME
    if path.is_file() and _is_valid(path.read_bytes()):
        return path
    if not should_download:
        raise UserError(f"{path} is missing or corrupt: run `bash scripts/setup.sh` to fetch it")
    return download()


def main() -> int:
    path = cache_dir() / FILE_NAME
    if path.is_file() and _is_valid(path.read_bytes()):
        print(f"setup: GPT-2 encoding present ({path})")
        return 0
    try:
        path = fetch_from_pypi()
    except (subprocess.CalledProcessError, StopIteration, OSError, UserError) as e:
        print(f"setup: PyPI route failed ({e}); trying {URL}", file=sys.stderr)
        try:
            path = download()
        except UserError as err:
            print(f"setup: {err}", file=sys.stderr)
            return 1
    print(f"setup: GPT-2 encoding installed ({path})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
