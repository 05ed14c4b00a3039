import json
import math
import os

import pytest
import torch

from gptrain.metrics import throughput
from gptrain.metrics.throughput import (
    estimate_mfu,
    flops_per_token,
    peak_flops,
    probe_peak,
    spec_peak,
)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTRAIN_SPEED_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("name, bf16_tflops", [
    ("NVIDIA H100 80GB HBM3", 989.4),
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.4),
    ("NVIDIA H200 NVL", 835.5),
    ("NVIDIA GH200 480GB", 989.4),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA L40S", 362.05),
    ("NVIDIA L40", 181.05),
    ("NVIDIA L4", 121.0),
    ("NVIDIA A10G", 70.0),
    ("NVIDIA A10", 125.0),
    ("NVIDIA GeForce RTX 4090", 165.2),
    ("NVIDIA GeForce RTX 3090", 71.0),
])
def test_spec_table_matches_device_names_on_word_boundaries(name, bf16_tflops):
    assert spec_peak(name, "bf16") == pytest.approx(bf16_tflops * 1e12)
    assert spec_peak(name, "fp16") == spec_peak(name, "bf16")


def test_spec_table_fp32_is_ieee_and_tf32_is_tensor_core():
    assert spec_peak("NVIDIA H100 80GB HBM3", "tf32") == pytest.approx(494.7e12)
    assert spec_peak("NVIDIA H100 80GB HBM3", "fp32") == pytest.approx(66.9e12)
    assert spec_peak("NVIDIA A100-SXM4-80GB", "tf32") == pytest.approx(156e12)
    assert spec_peak("NVIDIA A100-SXM4-80GB", "fp32") == pytest.approx(19.5e12)


@pytest.mark.parametrize("name", [
    "NVIDIA GeForce RTX 4090 D", "NVIDIA GeForce RTX 4090 Laptop GPU", "NVIDIA GeForce RTX 3090 Ti",
    "NVIDIA A100-SXM4-40GB MIG 1g.5gb", "NVIDIA H20", "NVIDIA A1000", "NVIDIA L4000", "Tesla V100-SXM2-16GB",
    "AMD Instinct MI300X",
])
def test_spec_table_leaves_other_parts_to_the_probe(name):
    assert spec_peak(name, "bf16") is None


def test_peak_flops_uses_the_table_for_known_gpus(monkeypatch):
    monkeypatch.setattr(throughput, "device_name", lambda device: "NVIDIA L40S")
    monkeypatch.setattr(throughput, "_is_tf32_enabled", lambda: True)
    assert peak_flops("cuda:1", "bf16") == (pytest.approx(362.05e12), "spec")
    assert peak_flops("cuda:1", "fp32") == (pytest.approx(183e12), "spec")
    monkeypatch.setattr(throughput, "_is_tf32_enabled", lambda: False)
    assert peak_flops("cuda:1", "fp32") == (pytest.approx(91.6e12), "spec")



@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch < 2.9")
def test_tf32_setting_is_read_from_torch():
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        assert throughput._is_tf32_enabled()
        matmul.fp32_precision = "ieee"
        assert not throughput._is_tf32_enabled()
    finally:
        matmul.fp32_precision = saved

def test_unknown_gpu_falls_back_to_the_probe(monkeypatch):
    monkeypatch.setattr(throughput, "device_name", lambda device: "NVIDIA Future GPU")
    monkeypatch.setattr(throughput, "measure_matmul_flops", lambda device, dtype: 42e12)
    assert peak_flops("cuda", "bf16") == (42e12, "probe")


def test_peak_flops_rejects_an_unknown_dtype():
    with pytest.raises(ValueError, match="dtype"):
        peak_flops("cpu", "int8")


def test_cpu_probe_is_positive_and_cached(monkeypatch, _cache):
    peak, basis = peak_flops("cpu")
    assert basis == "probe" and math.isfinite(peak) and peak > 1e8
    entries = json.loads((_cache / "peak_flops.json").read_text())
    (key, value), = entries.items()
    assert key.startswith("cpu: ") and "| fp32 |" in key and f"{torch.get_num_threads()} threads" in key
    assert value == peak

    def must_not_measure(*args):
        raise AssertionError("measured again despite the cache")

    monkeypatch.setattr(throughput, "_time_matmul", must_not_measure)
    assert peak_flops("cpu") == (peak, "probe")


def test_cache_is_keyed_by_threads(monkeypatch, _cache):
    rates = iter([1e9, 2e9])
    monkeypatch.setattr(throughput, "measure_matmul_flops", lambda device, dtype: next(rates))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert probe_peak("cpu", "cpu: test", "fp32") == 1e9
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert probe_peak("cpu", "cpu: test", "fp32") == 2e9
    assert len(json.loads((_cache / "peak_flops.json").read_text())) == 2


def test_unwritable_or_corrupt_cache_does_not_fail(monkeypatch, tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("GPTRAIN_SPEED_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(throughput, "measure_matmul_flops", lambda device, dtype: 3e9)
    assert probe_peak("cpu", "cpu: test", "fp32") == 3e9
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "peak_flops.json").write_text("{not json")
    monkeypatch.setenv("GPTRAIN_SPEED_CACHE", str(corrupt))
    assert probe_peak("cpu", "cpu: test", "fp32") == 3e9
    assert json.loads((corrupt / "peak_flops.json").read_text()) != {}
    assert [p.name for p in corrupt.iterdir()] == ["peak_flops.json"]  # no temp file left behind


def test_probe_grows_the_matmul_until_it_is_long_enough_to_time(monkeypatch):
    sizes = []

    def fake_time(a, b, kernel="aten"):
        sizes.append(a.shape[0])
        return 2 * a.shape[0] ** 3 / 1e11  # a device doing 100 GFLOP/s: a 1024 matmul takes 21 ms

    monkeypatch.setattr(throughput, "_time_matmul", fake_time)
    assert throughput.measure_matmul_flops("cpu", "fp32") == pytest.approx(1e11)
    assert sorted(set(sizes)) == [256, 512, 1024] and sizes.count(1024) > 2


def test_the_matmul_rate_is_the_fastest_kernels(monkeypatch):
    # On a CPU with oneDNN the step's matmuls can run on either kernel: the limit is the faster one's.
    rates = {"aten": 1e11, "onednn": 1.5e11}
    kernels_timed = []

    def fake_time(a, b, kernel="aten"):
        kernels_timed.append(kernel)
        return 2 * a.shape[0] ** 3 / rates[kernel]

    assert throughput.matmul_kernels("cuda", "bf16") == ("aten",) == throughput.matmul_kernels("cpu", "bf16")
    monkeypatch.setattr(throughput, "_time_matmul", fake_time)
    monkeypatch.setattr(throughput, "matmul_kernels", lambda device, dtype: ("aten", "onednn"))
    assert throughput.measure_matmul_flops("cpu", "fp32") == pytest.approx(1.5e11)
    assert {"aten", "onednn"} <= set(kernels_timed)
    monkeypatch.undo()
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    assert throughput._time_matmul(a, b, "aten") > 0 and throughput._time_matmul(a, b, "onednn") > 0


def test_device_name_of_the_cpu_names_the_model():
    name = throughput.device_name("cpu")
    assert name.startswith("cpu: ") and len(name) > len("cpu: ")


def test_the_speed_caches_machine_id_tells_apart_cpus_that_share_a_model_name(monkeypatch, tmp_path):
    """Two VMs both calling themselves "Intel(R) Xeon(R) Processor" but with other caches get other keys."""
    def fake_sys(l3: str):
        for index, (level, size) in enumerate([("1", "48K"), ("2", "2048K"), ("3", l3)]):
            folder = tmp_path / l3 / f"index{index}"
            folder.mkdir(parents=True)
            (folder / "level").write_text(level + "\n")
            (folder / "size").write_text(size + "\n")
        return tmp_path / l3

    real_path = throughput.Path
    ids = []
    for l3 in ("491520K", "107520K"):
        root = fake_sys(l3)
        monkeypatch.setattr(throughput, "Path", lambda p, root=root: root if "cpu0/cache" in str(p) else real_path(p))
        ids.append(throughput.machine_id("cpu"))
    assert ids[0].startswith(throughput.device_name("cpu")) and "L2 2048K, L3 491520K" in ids[0]
    assert ids[0] != ids[1] and "L3 107520K" in ids[1]


def test_mfu_divides_by_the_peak_of_all_devices(tiny_config):
    tokens_per_second = 1e6
    model_flops = flops_per_token(tiny_config) * tokens_per_second
    assert estimate_mfu(tiny_config, tokens_per_second, 1e12) == pytest.approx(model_flops / 1e12)
    assert estimate_mfu(tiny_config, tokens_per_second, 1e12, num_devices=8) == pytest.approx(model_flops / 8e12)
    assert estimate_mfu(tiny_config, tokens_per_second, None) is None



def test_failed_cache_write_leaves_no_temp_file(monkeypatch, _cache):
    def refuse(src, dst):
        raise PermissionError("read-only")

    monkeypatch.setattr(os, "replace", refuse)  # files.atomic_path's rename
    monkeypatch.setattr(throughput, "measure_matmul_flops", lambda device, dtype: 5e9)
    assert probe_peak("cpu", "cpu: test", "fp32") == 5e9
    assert list(_cache.iterdir()) == []


def test_a_higher_measured_rate_replaces_a_low_cached_probe(monkeypatch):
    monkeypatch.setattr(throughput, "measure_matmul_flops", lambda device, dtype: 4e9)  # a busy machine's probe
    assert peak_flops("cpu", "fp32") == (4e9, "probe")
    assert throughput.raise_probed_peak("cpu", "fp32", 200e9) == 200e9
    assert peak_flops("cpu", "fp32") == (200e9, "probe")
    assert throughput.raise_probed_peak("cpu", "fp32", 150e9) == 200e9  # a lower one changes nothing
