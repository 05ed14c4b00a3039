import time

from gptrain.metrics.system import SystemSampler


def test_system_rows_measure_this_process():
    sampler = SystemSampler("cpu", every_seconds=0.05)
    assert not sampler.is_due()
    end = time.monotonic() + 0.2
    while time.monotonic() < end:  # keep one core busy
        pass
    assert sampler.is_due()
    row = sampler.sample()
    assert 50 < row["cpu_percent"] <= 100 * row["num_cpus"] + 10  # about one core busy
    assert row["rss_bytes"] > 10_000_000 and 0 < row["memory_percent"] < 100
    assert "gpu_utilization" not in row and not sampler.is_due()
