"""GPU paths: run only where CUDA is present (skipped on CPU machines, never faked there)."""

import json
import subprocess
import sys

import pytest
import torch

from gptrain.model.chunked_loss import chunked_linear_cross_entropy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_chunked_loss_under_bf16_autocast_matches_the_plain_loss():
    torch.manual_seed(0)
    x = torch.randn(512, 256, device="cuda", requires_grad=True)
    w = (torch.randn(1024, 256, device="cuda") * 0.02).requires_grad_()
    targets = torch.randint(0, 1000, (512,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        chunked = chunked_linear_cross_entropy(x, w, targets, 1000, chunk_rows=128)
        plain = torch.nn.functional.cross_entropy((x @ w.T)[:, :1000].float(), targets)
    gx, gw = torch.autograd.grad(chunked, (x, w))
    px, pw = torch.autograd.grad(plain, (x, w))
    torch.testing.assert_close(chunked, plain, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(gx, px, rtol=5e-2, atol=1e-3)
    torch.testing.assert_close(gw, pw, rtol=5e-2, atol=1e-3)


def test_torchrun_one_gpu_bf16_compiled_trains(tmp_path, corpus_dir):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "gptrain",
           "train", "--data", str(corpus_dir), "--data.data_dir", str(tmp_path / "ds"), "--tokenizer", "char",
           "--embd", "64", "--layers", "2", "--heads", "2", "--context", "64", "--batch-size", "16", "--steps", "40",
           "--lr", "3e-3", "--compile", "on", "--quiet", "--run-dir", str(tmp_path / "run")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert train[-1]["loss"] < 0.7 * train[0]["loss"] and train[-1]["mfu"] is not None
