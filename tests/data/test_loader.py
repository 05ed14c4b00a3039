import numpy as np
import pytest
import torch

from gptrain.data.loader import ShardLoader
from gptrain.errors import UserError


def _paths(shard_dir, split):
    return sorted(shard_dir.glob(f"*_{split}_*.bin"))


def test_targets_are_inputs_shifted(shard_dir):
    loader = ShardLoader(_paths(shard_dir, "train"), batch_size=4, block_size=16, seed=1)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    # Contiguous, like the compile probe's tokens: a compiled model is specialised on strides.
    assert x.is_contiguous() and y.is_contiguous()


def test_epoch_visits_each_window_once(shard_dir):
    loader = ShardLoader(_paths(shard_dir, "train"), batch_size=1, block_size=16, seed=1)
    n = loader.windows_per_epoch
    assert n == 4999 // 16 + 2999 // 16
    seen = {tuple(loader.next_batch()[0][0].tolist()) for _ in range(n)}
    assert len(seen) == n and loader.epoch == 0
    loader.next_batch()
    assert loader.epoch == 1


def test_resume_position_gives_same_batches(shard_dir):
    a = ShardLoader(_paths(shard_dir, "train"), batch_size=8, block_size=16, seed=3)
    for _ in range(70):  # crosses an epoch boundary
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch()[0] for _ in range(5)]
    b = ShardLoader(_paths(shard_dir, "train"), batch_size=8, block_size=16, seed=3)
    b.load_state_dict(state)
    assert all(torch.equal(e, b.next_batch()[0]) for e in expected)


def test_ranks_get_disjoint_windows(shard_dir):
    r0 = ShardLoader(_paths(shard_dir, "train"), batch_size=4, block_size=16, rank=0, world_size=2)
    r1 = ShardLoader(_paths(shard_dir, "train"), batch_size=4, block_size=16, rank=1, world_size=2)
    a = {tuple(row.tolist()) for row in r0.next_batch()[0]}
    b = {tuple(row.tolist()) for row in r1.next_batch()[0]}
    assert not a & b


def test_sequential_loader_repeats_after_reset(shard_dir):
    val = ShardLoader(_paths(shard_dir, "val"), batch_size=2, block_size=16, shuffle=False, split="val")
    first = val.next_batch()[0]
    assert np.array_equal(first[0].numpy(), np.asarray(val.shards[0][:16]))
    val.reset()
    assert torch.equal(val.next_batch()[0], first)


def test_corpus_smaller_than_context_is_user_error(shard_dir):
    with pytest.raises(UserError, match="fewer than one context window"):
        ShardLoader(_paths(shard_dir, "val"), batch_size=2, block_size=4096, split="val")


def test_a_saved_position_is_refused_for_another_seed_dataset_or_global_batch(shard_dir):
    a = ShardLoader(_paths(shard_dir, "train"), batch_size=4, block_size=16, seed=3, fingerprint="abc")
    a.global_batch_tokens = 128
    a.next_batch()
    state = a.state_dict()
    expected = a.next_batch()[0]
    b = ShardLoader(_paths(shard_dir, "train"), batch_size=2, block_size=16, seed=3, fingerprint="abc")
    b.global_batch_tokens = 128
    b.load_state_dict(state)  # another micro batch (or number of ranks) is fine
    assert torch.equal(torch.cat([b.next_batch()[0], b.next_batch()[0]]), expected)
    for change, message in [(dict(seed=99), "seed 3"), (dict(fingerprint="xyz"), "dataset abc"),
                            (dict(global_batch_tokens=256), "global batch")]:
        c = ShardLoader(_paths(shard_dir, "train"), batch_size=4, block_size=16,
                        seed=change.get("seed", 3), fingerprint=change.get("fingerprint", "abc"))
        c.global_batch_tokens = change.get("global_batch_tokens", 128)
        with pytest.raises(UserError, match=message):
            c.load_state_dict(state)


def test_shards_each_shorter_than_a_window_are_refused(tmp_path):
    from gptrain.data.shards import write_shard

    paths = []
    for i in range(3):  # 3 x 10 tokens: enough in total, but no shard holds 16 + 1
        paths.append(tmp_path / f"x_train_{i:06d}.bin")
        write_shard(paths[-1], np.arange(10), 64)
    with pytest.raises(UserError, match="no train shard holds a whole context window"):
        ShardLoader(paths, batch_size=2, block_size=16)
