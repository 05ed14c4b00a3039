import math

import pytest

from gptrain.errors import UserError
from gptrain.train.schedule import ScheduleConfig, lr_at


def test_cosine_warmup_peak_and_end():
    cfg = ScheduleConfig(peak_lr=1.0, num_warmup_steps=10, final_lr_ratio=0.1)
    assert lr_at(0, 110, cfg) == pytest.approx(0.1)
    assert lr_at(4, 110, cfg) == pytest.approx(0.5)
    assert lr_at(9, 110, cfg) == pytest.approx(1.0)  # warmup ends at the peak
    assert lr_at(10, 110, cfg) == pytest.approx(1.0)
    mid = 10 + (110 - 1 - 10) / 2
    assert lr_at(int(mid), 110, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * int(mid - 10) / 99)))
    assert lr_at(109, 110, cfg) == pytest.approx(0.1)  # the last step is at the floor
    lrs = [lr_at(s, 110, cfg) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_other_kinds():
    lin = ScheduleConfig(peak_lr=1.0, num_warmup_steps=0, kind="linear", final_lr_ratio=0.0)
    assert lr_at(50, 101, lin) == pytest.approx(0.5)
    const = ScheduleConfig(peak_lr=0.3, num_warmup_steps=0, kind="constant")
    assert lr_at(99, 100, const) == 0.3
    wsd = ScheduleConfig(peak_lr=1.0, num_warmup_steps=0, kind="wsd", final_lr_ratio=0.0, decay_fraction=0.2)
    assert lr_at(70, 101, wsd) == 1.0 and lr_at(90, 101, wsd) == pytest.approx(0.5)
    assert lr_at(100, 101, wsd) == pytest.approx(0.0)


def test_bad_schedule():
    with pytest.raises(UserError):
        ScheduleConfig(kind="step")
    with pytest.raises(UserError):
        ScheduleConfig(peak_lr=0)
