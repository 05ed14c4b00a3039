import numpy as np
import pytest

from gptrain.data import shards
from gptrain.data.info import describe
from gptrain.data.shards import HEADER_BYTES, ShardFile, dtype_for, open_shard, write_shard
from gptrain.errors import UserError


@pytest.mark.parametrize("vocab_size,itemsize,magic,version", [(50257, 2, 20240520, 1), (100_000, 4, 20240801, 7)])
def test_round_trip_in_llmc_format(tmp_path, vocab_size, itemsize, magic, version):
    tokens = np.random.default_rng(0).integers(0, vocab_size, 1000)
    path = tmp_path / "x_train_000000.bin"
    write_shard(path, tokens, vocab_size)
    header = np.fromfile(path, dtype="<i4", count=256)
    assert (header[0], header[1], header[2]) == (magic, version, 1000) and not header[3:].any()
    assert path.stat().st_size == HEADER_BYTES + 1000 * itemsize
    loaded = open_shard(path)
    assert isinstance(loaded, np.memmap) and loaded.dtype.itemsize == itemsize
    assert np.array_equal(np.asarray(loaded), tokens)
    assert not list(tmp_path.glob("*.part"))


def _write_like_llmc(path, tokens, magic, version, dtype):
    """What llm.c's dev/data/data_common.py write_datafile does."""
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = magic, version, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.array(tokens, dtype=dtype).tobytes())


@pytest.mark.parametrize("magic,version,dtype", [(20240520, 1, np.uint16), (20240801, 7, np.uint32)])
def test_reads_shards_written_the_way_llmc_writes_them(tmp_path, magic, version, dtype):
    tokens = [5, 70_000 if dtype == np.uint32 else 65_535, 0, 128_000 if dtype == np.uint32 else 1]
    _write_like_llmc(tmp_path / "a.bin", tokens, magic, version, dtype)
    assert list(open_shard(tmp_path / "a.bin")) == tokens
    assert f"magic {magic} version {version}" in describe(tmp_path / "a.bin")


def test_older_gptrain_uint32_shards_are_read_with_a_note(tmp_path, capsys):
    _write_like_llmc(tmp_path / "old.bin", [1, 99_999], 20240520, 2, np.uint32)
    assert list(open_shard(tmp_path / "old.bin")) == [1, 99_999]
    assert "older uint32 shards" in capsys.readouterr().err


def test_bad_truncated_and_unknown_version_shards(tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x00" * 2048)
    with pytest.raises(UserError, match="not a token shard"):
        open_shard(bad)
    _write_like_llmc(tmp_path / "v9.bin", [1], 20240801, 9, np.uint32)
    with pytest.raises(UserError, match="shard version 9"):
        open_shard(tmp_path / "v9.bin")
    good = tmp_path / "good.bin"
    write_shard(good, np.arange(100), 1000)
    good.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(UserError, match="truncated"):
        open_shard(good)


def test_a_shard_file_is_absent_until_finished_and_can_be_cut_back(tmp_path):
    path = tmp_path / "s.bin"
    shard = ShardFile(path, dtype_for(100))
    shard.append(np.arange(10))
    shard.sync()
    assert not path.exists() and shard.part.exists()
    shard.close()
    resumed = ShardFile(path, dtype_for(100), keep_tokens=6)  # the manifest said 6 were durable
    resumed.append(np.array([42]))
    resumed.finish()
    assert list(open_shard(path)) == [0, 1, 2, 3, 4, 5, 42] and not shard.part.exists()


def test_finishing_a_shard_fsyncs_its_folder_after_the_rename(tmp_path, monkeypatch):
    path, seen = tmp_path / "s.bin", []
    monkeypatch.setattr(shards, "fsync_dir", lambda folder: seen.append((folder, path.exists())))
    write_shard(path, np.arange(3), 100)
    assert seen == [(tmp_path, True)]
