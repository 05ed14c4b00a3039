import torch

from gptrain.metrics.machine import describe_machine

KEYS = {"hostname", "platform", "python", "torch", "gptrain", "cpu", "num_cpus", "device", "gpu", "num_gpus"}


def test_describe_machine_on_the_cpu():
    machine = describe_machine("cpu")
    assert KEYS <= set(machine) and machine["device"] == "cpu" and machine["gpu"] is None
    assert machine["torch"] == torch.__version__ and machine["num_cpus"] >= 1 and machine["cpu"]
    assert machine["gptrain"] not in ("", None)
