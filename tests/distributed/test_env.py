import pytest

from gptrain.distributed.env import DistEnv, resolve_device
from gptrain.errors import UserError


def test_single_process_outside_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    env = DistEnv.from_environment("cpu")
    assert (env.rank, env.world_size, env.is_main, env.device) == (0, 1, True, "cpu")


def test_torchrun_variables_are_read(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    env = DistEnv.from_environment("cpu")
    assert (env.rank, env.local_rank, env.world_size, env.is_main) == (3, 1, 4, False)


def test_device_choice():
    assert resolve_device("auto") in ("cpu", "cuda", "mps")
    with pytest.raises(UserError, match="device must be one of"):
        resolve_device("tpu")
