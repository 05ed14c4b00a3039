import numpy as np
import pytest

from gptrain.data.shards import HEADER_BYTES, MAGIC, open_shard, write_shard
from gptrain.errors import UserError


@pytest.mark.parametrize("vocab_size,itemsize,version", [(50257, 2, 1), (100_000, 4, 2)])
def test_round_trip_llmc_format(tmp_path, vocab_size, itemsize, version):
    tokens = np.random.default_rng(0).integers(0, vocab_size, 1000)
    path = tmp_path / "x_train_000000.bin"
    write_shard(path, tokens, vocab_size)
    header = np.fromfile(path, dtype="<i4", count=256)
    assert header[0] == MAGIC and header[1] == version and header[2] == 1000
    assert path.stat().st_size == HEADER_BYTES + 1000 * itemsize
    loaded = open_shard(path)
    assert isinstance(loaded, np.memmap)
    assert np.array_equal(np.asarray(loaded), tokens)
    assert not list(tmp_path.glob("*.tmp"))


def test_bad_and_truncated_shards(tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x00" * 2048)
    with pytest.raises(UserError, match="not a token shard"):
        open_shard(bad)
    good = tmp_path / "good.bin"
    write_shard(good, np.arange(100), 1000)
    good.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(UserError, match="truncated"):
        open_shard(good)
