"""Downloads against a fake Hub on 127.0.0.1: Hub files in a subprocess (huggingface_hub reads HF_ENDPOINT
at import), plain URLs in-process."""

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from gptrain.data import download
from gptrain.data.download import http_file
from gptrain.errors import UserError
from fake_hub import FakeHub, call  # tests/ is on sys.path: conftest.py lives there

BIG = bytes(range(256)) * 2000  # 512 KB: several chunks, so a drop lands mid-file
SHA_BIG = hashlib.sha256(BIG).hexdigest()
FILES = {
    "datasets/org/corpus/data/train-00001.parquet": BIG,
    "datasets/org/corpus/README.md": b"# corpus\n",
    "datasets/org/corpus/data/train-00000.parquet": b"first shard",
    "datasets/org/corpus/data/notes.txt": b"not a shard",
    "datasets/org/corpus/extra/train-00002.parquet": b"elsewhere",
}
BIG_KEY = "datasets/org/corpus/data/train-00001.parquet"


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("GPTRAIN_OFFLINE", raising=False)


@pytest.fixture
def hub():
    with FakeHub(FILES, non_lfs=("datasets/org/corpus/README.md",), page_size=2) as server:
        yield server


def hub_file(hub, tmp_path, filename, *, is_offline=False, **kwargs) -> dict:
    env = hub.env(tmp_path / "hf", is_offline=is_offline)
    return call(env, "gptrain.data.download:hub_file", "org/corpus", filename, revision="main", **kwargs)


def test_import_is_light():
    code = "import sys, gptrain.data.download; print(sorted({'torch', 'huggingface_hub'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_hub_file_downloads_and_verifies(hub, tmp_path):
    got = hub_file(hub, tmp_path, "data/train-00001.parquet", size=len(BIG), sha256=SHA_BIG)
    path = Path(got["result"])
    assert path.read_bytes() == BIG
    assert path.is_relative_to(tmp_path / "hf" / "hub") and hub.commit in path.parts
    small = hub_file(hub, tmp_path, "README.md", sha256=hashlib.sha256(b"# corpus\n").hexdigest())
    assert Path(small["result"]).read_bytes() == b"# corpus\n"


def test_hub_file_resumes_after_a_dropped_connection(tmp_path):
    # huggingface_hub 2.4 resumes within the call, from the 10 MiB chunks it has written, and deletes its partial
    # file when a call fails; so the resume shows inside one hub_file call, on a file above one chunk.
    data = bytes(range(256)) * (48 << 10)  # 12 MiB
    key = "datasets/org/big/shard.bin"
    with FakeHub({key: data}) as big_hub:
        resolve = big_hub.resolve_path(key)
        big_hub.drop_after(resolve, 11 << 20)
        env = big_hub.env(tmp_path / "hf")
        got = call(env, "gptrain.data.download:hub_file", "org/big", "shard.bin", revision="main",
                   size=len(data), sha256=hashlib.sha256(data).hexdigest())
        ranges = [r for method, path, r in big_hub.requests if method == "GET" and path == resolve and r]
    assert Path(got["result"]).read_bytes() == data
    assert len(ranges) == 1 and 0 < int(ranges[0].removeprefix("bytes=").split("-")[0]) <= 11 << 20
    assert not list((tmp_path / "hf").rglob("*.incomplete"))


def test_hub_file_mismatches_are_user_errors(hub, tmp_path):
    wrong = "0" * 64
    lfs = hub_file(hub, tmp_path, "data/train-00001.parquet", sha256=wrong)
    assert "sha256" in lfs["error"] and SHA_BIG in lfs["error"]
    size = hub_file(hub, tmp_path, "data/train-00001.parquet", size=len(BIG) + 1)
    assert "bytes" in size["error"] and str(len(BIG) + 1) in size["error"]
    # A non-LFS file's blob is named by its git sha1, so its bytes are hashed; a bad one is removed.
    plain = hub_file(hub, tmp_path, "README.md", sha256=wrong)
    assert "removed" in plain["error"]
    assert not list((tmp_path / "hf").rglob("README.md"))


def test_hub_file_checks_the_sha256_the_hub_publishes(hub, tmp_path):
    hub.corrupted.add("data/train-00001.parquet")
    try:
        result = hub_file(hub, tmp_path, "data/train-00001.parquet")  # no sha256 in the catalogue: the Hub's own
    finally:
        hub.corrupted.clear()
    assert "arrived with sha256" in result["error"] and SHA_BIG in result["error"] and "removed" in result["error"]


def test_hub_file_missing_file_is_a_user_error(hub, tmp_path):
    assert "no such file" in hub_file(hub, tmp_path, "data/missing.parquet")["error"]


def test_hub_list_returns_sorted_glob_matches(hub, tmp_path):
    env = hub.env(tmp_path / "hf")
    got = call(env, "gptrain.data.download:hub_list", "org/corpus", "data/train-*.parquet", revision="main")
    assert got["result"] == ["data/train-00000.parquet", "data/train-00001.parquet"]
    assert any("cursor=" in path for _, path, _ in hub.requests)  # page_size=2: the Link header was followed
    everything = call(env, "gptrain.data.download:hub_list", "org/corpus", "*.parquet", revision="main")
    assert everything["result"][-1] == "extra/train-00002.parquet"  # fnmatch's `*` crosses "/"


def test_offline_uses_the_cache_and_reports_what_is_missing(hub, tmp_path):
    online = hub_file(hub, tmp_path, "data/train-00000.parquet")["result"]
    num_requests = len(hub.requests)
    assert hub_file(hub, tmp_path, "data/train-00000.parquet", is_offline=True)["result"] == online
    missing = hub_file(hub, tmp_path, "data/train-00001.parquet", is_offline=True)["error"]
    assert "HF_HUB_OFFLINE" in missing
    offline = hub.env(tmp_path / "hf", is_offline=True)
    listed = call(offline, "gptrain.data.download:hub_list", "org/corpus", "data/*", revision="main")
    assert listed["result"] == ["data/train-00000.parquet"]  # what the cache holds for that revision
    assert call(offline, "gptrain.data.download:hub_commit", "org/corpus", "main")["result"] == hub.commit
    assert call(offline, "gptrain.data.download:hub_commit", "org/corpus", "v2")["result"] is None
    assert len(hub.requests) == num_requests


def test_offline_listing_without_cache_is_a_user_error(hub, tmp_path):
    offline = hub.env(tmp_path / "hf", is_offline=True)
    got = call(offline, "gptrain.data.download:hub_list", "org/corpus", "data/*", revision="main")
    assert "HF_HUB_OFFLINE" in got["error"]


def test_hub_commit_online(hub, tmp_path):
    got = call(hub.env(tmp_path / "hf"), "gptrain.data.download:hub_commit", "org/corpus", "main")
    assert got["result"] == hub.commit


def test_http_file_downloads_once(hub, tmp_path):
    url = f"{hub.url}/{BIG_KEY}"
    path = http_file(url, cache_dir=tmp_path, size=len(BIG), sha256=SHA_BIG, log=lambda line: None)
    assert path.read_bytes() == BIG
    assert path.parent.name == hashlib.sha256(url.encode()).hexdigest()[:12] and path.name == "train-00001.parquet"
    assert not list(tmp_path.rglob("*.part"))
    num_requests = len(hub.requests)
    assert http_file(url, cache_dir=tmp_path, size=len(BIG), log=lambda line: None) == path
    assert len(hub.requests) == num_requests


def test_http_file_resumes_after_a_dropped_connection(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(download, "PROGRESS_SECONDS", 0.0)
    lines = []
    url = f"{hub.url}/{BIG_KEY}"
    hub.drop_after(f"/{BIG_KEY}", 150_000)
    with pytest.raises(UserError, match="run again to resume"):
        http_file(url, cache_dir=tmp_path, sha256=SHA_BIG, log=lines.append)
    assert next(tmp_path.rglob("*.part")).stat().st_size == 150_000
    path = http_file(url, cache_dir=tmp_path, sha256=SHA_BIG, log=lines.append)
    assert path.read_bytes() == BIG
    assert hub.requests[-1] == ("GET", f"/{BIG_KEY}", "bytes=150000-")
    assert any("MB/s" in line for line in lines) and "from byte 150000" in "\n".join(lines)


def test_http_file_restarts_when_the_server_ignores_ranges(hub, tmp_path):
    url = f"{hub.url}/{BIG_KEY}"
    hub.drop_after(f"/{BIG_KEY}", 150_000)
    with pytest.raises(UserError):
        http_file(url, cache_dir=tmp_path, log=lambda line: None)
    hub.is_ignoring_ranges = True
    path = http_file(url, cache_dir=tmp_path, size=len(BIG), sha256=SHA_BIG, log=lambda line: None)
    assert path.read_bytes() == BIG and hub.requests[-1][2] == "bytes=150000-"


def test_http_file_mismatch_and_missing_are_user_errors(hub, tmp_path):
    url = f"{hub.url}/{BIG_KEY}"
    with pytest.raises(UserError, match=f"expected {len(BIG) - 1}"):
        http_file(url, cache_dir=tmp_path, size=len(BIG) - 1, log=lambda line: None)
    with pytest.raises(UserError, match="sha256"):
        http_file(url, cache_dir=tmp_path, sha256="0" * 64, log=lambda line: None)
    assert not list(tmp_path.rglob("train-00001.parquet*"))
    with pytest.raises(UserError, match="HTTP 404"):
        http_file(f"{hub.url}/no/such/file.bin", cache_dir=tmp_path, log=lambda line: None)


def test_gptrain_offline_needs_the_file_cached(hub, tmp_path, monkeypatch):
    url = f"{hub.url}/{BIG_KEY}"
    monkeypatch.setenv("GPTRAIN_OFFLINE", "1")
    with pytest.raises(UserError, match="GPTRAIN_OFFLINE"):
        http_file(url, cache_dir=tmp_path, log=lambda line: None)
    assert hub.requests == []
    monkeypatch.delenv("GPTRAIN_OFFLINE")
    path = http_file(url, cache_dir=tmp_path, log=lambda line: None)
    monkeypatch.setenv("GPTRAIN_OFFLINE", "1")
    assert http_file(url, cache_dir=tmp_path, log=lambda line: None) == path
