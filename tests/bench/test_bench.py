"""`gptrain bench`: the JSON result (ratios, phases, MFU), its chart, the reference being the same model,
compiled timings, and llm.c at its fixed shape through a stand-in binary. No timed assertions."""

from __future__ import annotations

import json
import math
import stat
import sys

import pytest

from gptrain.bench import run as bench_run
from gptrain.bench.reference import reference_like
from gptrain.bench.run import BenchOptions, run_bench
from gptrain.cli import main
from gptrain.model.gpt import GPT, ModelConfig

TINY = ["--layers", "1", "--embd", "32", "--heads", "2", "--context", "16", "--vocab", "70", "--batch-size", "2"]


@pytest.fixture(autouse=True)
def _short_matmul_rate(monkeypatch):
    """A short matmul rate measurement (bench's own takes about a second before and after the steps)."""
    monkeypatch.setattr(bench_run, "MATMUL_RATE_SECONDS", 0.02)


def test_the_matmul_rate_is_the_best_of_before_and_after_the_steps(monkeypatch):
    rates = iter([2e9, 3e9])
    monkeypatch.setattr(bench_run, "measure_matmul_flops", lambda device, dtype, **_: next(rates))
    result = run_bench(BenchOptions(model=ModelConfig(n_embd=32, n_layer=1, n_head=2, block_size=16, vocab_size=70),
                                    batch_size=2, steps=1, warmup=0), log=lambda *_: None)
    assert result["matmul_flops_per_s_before_after"] == [2e9, 3e9] and result["matmul_flops_per_s"] == 3e9
    step_s = result["runs"]["gptrain"]["step_s"]
    assert result["matmul_limit_fraction"] == pytest.approx(result["step_flop"] / (step_s * 3e9))


def test_bench_compares_with_the_reference_and_writes_json_and_png(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", *TINY, "--compare", "reference", "--steps", "3", "--warmup", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["runs"]) == {"gptrain", "reference"}
    for run in result["runs"].values():
        assert all(run[f"{phase}_s"] > 0 for phase in ("forward", "backward", "optimizer", "step"))
        assert run["tokens_per_s"] == pytest.approx(2 * 16 / run["step_s"])
    ours, ref = result["runs"]["gptrain"], result["runs"]["reference"]
    assert result["step_time_ratio"] == pytest.approx(ours["step_s"] / ref["step_s"])
    limit = result["step_flop"] / (ours["step_s"] * result["matmul_flops_per_s"])
    assert result["matmul_limit_fraction"] == pytest.approx(limit)
    assert 0 < ours["mfu"] and result["shape"]["n_layer"] == 1 and result["shape"]["vocab_size"] == 70
    # Same weights, same batch: the first losses agree, so the reference is the same model.
    assert result["first_step_loss"]["gptrain"] == pytest.approx(result["first_step_loss"]["reference"], abs=1e-5)
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    printed = capsys.readouterr().out
    assert "step_time_ratio" in printed and "matmul_limit_fraction" in printed


def test_bench_times_bf16_autocast_on_the_cpu(tmp_path):
    out = tmp_path / "b.json"
    assert main(["bench", *TINY, "--compare", "reference", "--steps", "2", "--warmup", "1", "--dtype", "bf16",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["dtype"] == "bf16" and "bf16" in result["title"]
    # Both models under the same autocast, from the same weights: their first losses agree within bf16 rounding.
    assert result["first_step_loss"]["gptrain"] == pytest.approx(result["first_step_loss"]["reference"], rel=2e-2)


def test_reference_is_gptrains_math():
    import torch

    torch.manual_seed(0)
    model = GPT(ModelConfig(n_embd=32, n_layer=2, n_head=4, block_size=16, vocab_size=70, bias=False))
    ref = reference_like(model)
    x, y = torch.randint(0, 70, (3, 16)), torch.randint(0, 70, (3, 16))
    torch.testing.assert_close(model(x, y), ref(x, y), rtol=1e-5, atol=1e-5)


def test_compiled_timings_say_when_compile_pays(tmp_path):
    cfg = ModelConfig(n_embd=32, n_layer=1, n_head=2, block_size=16, vocab_size=70)
    result = run_bench(BenchOptions(model=cfg, batch_size=2, steps=2, warmup=0, compare="reference", compile=True,
                                    compile_backend="aot_eager"), log=lambda *_: None)
    for name in ("gptrain", "reference"):
        compiled = result["compiled"][name]
        assert compiled["first_step_s"] >= compiled["compile_s"] >= 0 and compiled["step_s"] > 0
        # With the compiling step counted, the speed over the run is below the compiled steps' speed.
        assert compiled["tokens_per_s_with_compile"] <= compiled["tokens_per_s"]
    # Eager twins ran in turns with the compiled models; the ratio and the break-even are taken against them.
    assert set(result["compiled"]) == set(result["eager_beside_compiled"]) == {"gptrain", "reference"}
    assert result["compiled_step_time_ratio"] == pytest.approx(
        result["compiled"]["gptrain"]["step_s"] / result["eager_beside_compiled"]["reference"]["step_s"])
    for name, compiled in result["compiled"].items():
        saving = result["eager_beside_compiled"][name]["step_s"] - compiled["step_s"]
        even = compiled["break_even_steps"]
        assert even == (math.ceil(compiled["compile_s"] / saving) if saving > 0 else None)


@pytest.mark.slow  # two steps of GPT-2 124M on the CPU: about 10 s
def test_llmc_runs_gptrain_at_its_shape_and_reports_the_ratio(tmp_path, capsys):
    binary = tmp_path / "train_gpt2"
    lines = [f"step {i}: train loss {5 - i * 0.1:f} (took {ms:f} ms)" for i, ms in enumerate([900.0, 500.0, 700.0])]
    binary.write_text(f"#!{sys.executable}\nprint('[GPT-2]\\nnum_layers: 12')\n"
                      + "".join(f"print({line!r}, flush=True)\n" for line in lines))
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    out = tmp_path / "b.json"
    # ATen kernels: no linear probe at 124M, which is not what this test is about
    assert main(["bench", "--llmc", str(binary), "--steps", "2", "--warmup", "0", "--cpu-linear", "aten",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "gptrain runs GPT-2 124M at B=4, T=64" not in capsys.readouterr().out  # the defaults are llm.c's shape
    assert (result["shape"]["n_layer"], result["shape"]["context"], result["shape"]["batch_size"]) == (12, 64, 4)
    assert result["runs"]["llmc"]["step_s"] == pytest.approx(0.6)  # median of 500 and 700 ms; step 0 left out
    assert result["llmc_step_time_ratio"] == pytest.approx(result["runs"]["gptrain"]["step_s"] / 0.6)


def test_a_missing_llmc_binary_is_refused_before_any_timing(tmp_path, capsys):
    assert main(["bench", "--llmc", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "make train_gpt2" in err and "Traceback" not in err


@pytest.mark.parametrize("flags, message", [(["--steps", "0"], "--steps >= 1"), (["--threads", "-1"], "--threads"),
                                            (["--dtype", "fp16"], "invalid choice"),
                                            (["--heads", "5"], "not divisible")])
def test_bad_bench_flags_are_one_line_errors(flags, message, capsys):
    assert main(["bench", *TINY[:-2], *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_step_time_script_still_runs_at_any_shape():
    import subprocess
    from pathlib import Path

    script = Path(__file__).parents[2] / "benchmarks" / "step_time.py"
    flags = ["--layers", "1", "--embd", "32", "--heads", "2", "--vocab", "70", "--context", "16", "--steps", "2"]
    done = subprocess.run([sys.executable, str(script), *flags, "--warmup", "1"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "step_time_ratio" in done.stdout and "first-step loss" in done.stdout


def test_matmul_shapes_script_counts_every_matmul_of_a_step():
    import re
    import subprocess
    from pathlib import Path

    script = Path(__file__).parents[2] / "benchmarks" / "matmul_shapes.py"
    flags = ["--layers", "3", "--embd", "256", "--vocab", "70", "--context", "16", "--batch-size", "2", "--repeats", "1"]
    done = subprocess.run([sys.executable, str(script), *flags], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # 3 passes of 4 block linears x 3 layers and of the head; FLOP = 2 * rows * (12 E^2 * layers + E * vocab) * 3
    assert len(re.findall(r" x3 ", done.stdout)) == 12 and len(re.findall(r" x1 ", done.stdout)) == 3
    assert len(re.findall(r"GFLOP/s  (?:aten|onednn)\n", done.stdout)) == 15  # each on its faster kernel
    flop = float(re.search(r"for ([\d.]+) GFLOP", done.stdout).group(1)) * 1e9
    assert abs(flop - 2 * 32 * (12 * 256**2 * 3 + 256 * 70) * 3) < 1e6
    fraction = float(re.search(r"large-matrix rate ([\d.]+)", done.stdout).group(1))
    assert 0 < fraction < 5
