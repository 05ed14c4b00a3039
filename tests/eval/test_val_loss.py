import math

import numpy as np
import torch

from gptrain.data.loader import ShardLoader
from gptrain.data.shards import write_shard
from gptrain.eval.val_loss import evaluate_loss, full_split_windows, sample_windows
from gptrain.tokenizer import TokenizerConfig, build_tokenizer


def _val_loader(folder, batch_size=4, rank=0, world_size=1):
    return ShardLoader(sorted(folder.glob("*_val_*.bin")), batch_size=batch_size, block_size=16, shuffle=False,
                       split="val", rank=rank, world_size=world_size)


def test_val_loss_is_deterministic_and_matches_a_direct_computation(tiny_model, shard_dir):
    loader = _val_loader(shard_dir)
    windows = sample_windows(loader, 12)
    a = evaluate_loss(tiny_model, loader, windows, device="cpu")
    b = evaluate_loss(tiny_model, loader, windows, device="cpu")
    assert a["val_loss"] == b["val_loss"] and math.isclose(a["val_perplexity"], math.exp(a["val_loss"]))
    assert math.isnan(a["val_bpb"])  # no byte lengths given
    with torch.no_grad():
        x, y = loader.read(windows[:, :2])
        direct = tiny_model(x, y).item()
    assert math.isclose(a["val_loss"], direct, rel_tol=1e-6) and a["val_num_tokens"] == 12 * 16
    assert tiny_model.training  # evaluation restores training mode


def test_val_sample_spans_the_whole_split_and_is_the_same_for_one_and_two_ranks(tiny_model, shard_dir):
    one = _val_loader(shard_dir)
    windows = sample_windows(one, 12)
    all_windows = one.split_windows()
    assert len(np.unique(windows[:, 1])) == 12 and (np.diff(windows[:, 1]) > 0).all()
    # One pick in each twelfth of the split: the first and last twelfths are both represented.
    n = len(all_windows)
    assert windows[0, 1] < all_windows[n // 12, 1] and windows[-1, 1] >= all_windows[n - n // 12 - 1, 1]
    assert (sample_windows(one, 12) == windows).all()
    assert len(sample_windows(one, 10_000)) == n  # a small split is used whole
    single = evaluate_loss(tiny_model, one, windows, device="cpu")
    per_rank, bytes_args = [], {"byte_lengths": [1 + i % 3 for i in range(64)], "eot_id": 5}
    for rank in (0, 1):  # two ranks in turn: each scores its share, then the sums are added
        loader = _val_loader(shard_dir, batch_size=2, rank=rank, world_size=2)
        evaluate_loss(tiny_model, loader, windows, device="cpu", reduce_sum=lambda t: per_rank.append(t.clone()),
                      **bytes_args)
    summed = per_rank[0] + per_rank[1]
    alone = []
    evaluate_loss(tiny_model, one, windows, device="cpu", reduce_sum=lambda t: alone.append(t.clone()), **bytes_args)
    assert torch.allclose(summed, alone[0], rtol=1e-6)  # nats, targets, nats and bytes without separators
    assert math.isclose(single["val_loss"], (summed[0] / summed[1]).item(), rel_tol=1e-6)


def test_full_split_scores_every_token_but_each_shards_first(tiny_model, tmp_path):
    rng = np.random.default_rng(1)
    shards = [rng.integers(0, 64, 16 * 5 + 7), rng.integers(0, 64, 10)]  # a tail of 6 targets; a short shard
    for i, tokens in enumerate(shards):
        write_shard(tmp_path / f"t_val_{i:06d}.bin", tokens, 64)
    loader = _val_loader(tmp_path)
    got = evaluate_loss(tiny_model, loader, full_split_windows(loader), device="cpu")
    assert got["val_num_tokens"] == sum(len(t) - 1 for t in shards)
    # Directly: each target scored once, with the context of its window (the tail window: 16 tokens).
    total = 0.0
    with torch.no_grad():
        for shard, start, skip in full_split_windows(loader):
            tokens = shards[shard][start : start + 17]
            x = torch.tensor(tokens[:-1], dtype=torch.long)[None]
            y = torch.tensor(tokens[1:], dtype=torch.long)[None]
            total += tiny_model(x, y, reduction="none")[0, skip:].sum().item()
    assert math.isclose(got["val_loss"], total / got["val_num_tokens"], rel_tol=1e-6)


def test_bits_per_byte_follows_its_definition_on_a_hand_checked_text(tmp_path):
    """nats of the non-separator targets / (ln 2 x their UTF-8 bytes); a separator counts 0 bytes."""
    tok = build_tokenizer(TokenizerConfig(kind="char"), ["ab é✓"])
    text_ids = tok.encode("ab é✓ab é✓ab é✓") + [tok.eot_id] + tok.encode("ab é✓ab é✓ab")
    write_shard(tmp_path / "t_val_000000.bin", np.array(text_ids), tok.vocab_size)
    loader = ShardLoader([tmp_path / "t_val_000000.bin"], batch_size=1, block_size=len(text_ids) - 1, shuffle=False)

    class Uniform(torch.nn.Module):  # every target costs ln(vocab) nats
        def forward(self, x, y, reduction="mean"):
            return torch.full(y.shape, math.log(tok.vocab_size))

    got = evaluate_loss(Uniform(), loader, full_split_windows(loader), "cpu", byte_lengths=tok.byte_lengths(),
                        eot_id=tok.eot_id)
    targets = text_ids[1:]
    # By hand: a=1, b=1, " "=1, é=2, ✓=3 bytes; the separator target counts in the loss but not in bpb.
    num_bytes = sum({"a": 1, "b": 1, " ": 1, "é": 2, "✓": 3}[tok.decode([i])] for i in targets if i != tok.eot_id)
    num_counted = sum(1 for i in targets if i != tok.eot_id)
    assert got["val_num_tokens"] == len(targets)
    expected = num_counted * math.log(tok.vocab_size) / (math.log(2) * num_bytes)
    assert math.isclose(got["val_bpb"], expected, rel_tol=1e-6)
    assert math.isclose(got["val_loss"], math.log(tok.vocab_size), rel_tol=1e-6)
