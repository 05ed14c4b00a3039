"""The parallel encoder: forked (`gptrain data prepare`) and spawned (the API) workers agree."""

import subprocess
import sys

from gptrain.data import encode
from gptrain.data.prepare import DataConfig, prepare_dataset
from gptrain.tokenizer import TokenizerConfig

QUIET = dict(log=lambda *_: None)


def test_forked_and_spawned_workers_write_identical_shards(corpus_dir, tmp_path):
    """The API spawns its workers; `gptrain data prepare` forks them."""
    assert encode.start_method(may_fork=False) == "spawn"  # (fork needs one thread: the subprocess below checks it)
    spawned = prepare_dataset(DataConfig(source=str(corpus_dir), data_dir=str(tmp_path / "a" / "ds"),
                                         shard_tokens=1500, num_workers=2), TokenizerConfig(kind="gpt2"), **QUIET)
    code = ("import sys; from gptrain.data import encode; real = encode.start_method; "
            "encode.start_method = lambda may_fork: 'fork' if real(may_fork) == 'fork' else sys.exit(3); "
            "from gptrain.cli import main; sys.exit(main(sys.argv[1:]))")
    subprocess.run([sys.executable, "-c", code, "data", "prepare", str(corpus_dir), "--tokenizer", "gpt2",
                    "--out", str(tmp_path / "b" / "ds"), "--workers", "2", "--data.shard_tokens", "1500"],
                   check=True, capture_output=True)
    names = sorted(p.name for p in spawned.glob("*.bin"))
    assert len(names) > 4 and names == sorted(p.name for p in (tmp_path / "b" / "ds").glob("*.bin"))
    assert all((spawned / n).read_bytes() == (tmp_path / "b" / "ds" / n).read_bytes() for n in names)
