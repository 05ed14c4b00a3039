import math

import torch

from gptrain.data.loader import ShardLoader
from gptrain.eval.val_loss import evaluate_loss


def test_val_loss_is_deterministic_and_matches_a_direct_computation(tiny_model, shard_dir):
    loader = ShardLoader(sorted(shard_dir.glob("*_val_*.bin")), batch_size=4, block_size=16, shuffle=False, split="val")
    a = evaluate_loss(tiny_model, loader, num_windows=12, device="cpu")
    b = evaluate_loss(tiny_model, loader, num_windows=12, device="cpu")
    assert a == b and math.isclose(a["val_perplexity"], math.exp(a["val_loss"]))
    loader.reset()
    with torch.no_grad():
        direct = sum(tiny_model(*loader.next_batch()).item() for _ in range(3)) / 3
    assert math.isclose(a["val_loss"], direct, rel_tol=1e-6)
    assert tiny_model.training  # evaluation restores training mode
