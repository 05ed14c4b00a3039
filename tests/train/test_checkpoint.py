from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from gptrain.config import RunConfig, to_toml
from gptrain.distributed.state import gather_state, key_by_index, list_param_names, load_optimizer_state
from gptrain.errors import UserError
from gptrain.model.gpt import GPT
from gptrain.train import checkpoint as ckpt
from gptrain.train.optim import OptimConfig, build_optimizer
from gptrain.train.saving import check_resume_config


def _trained(tiny_config):
    model = GPT(tiny_config)
    opt = build_optimizer(model, OptimConfig(), lr=1e-3)
    model(torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))).backward()
    opt.step()
    return model, opt


def _snapshot(model, opt, step=3):
    model_sd, optim_sd = gather_state(model, opt, is_main=True)
    tensors, meta = ckpt.split_optimizer_state(optim_sd)
    state = ckpt.make_state(ckpt.TrainState(step=step, best_val_loss=2.5), {"epoch": 1, "position": 7}, meta,
                            [ckpt.capture_rng()])
    return ckpt.Snapshot(model=model_sd, optimizer=tensors, state=state,
                         config_toml=to_toml(RunConfig()), tokenizer_json='{"gptrain_tokenizer": "char", "chars": []}')


def test_round_trip_model_optimizer_state(tiny_config, tmp_path):
    model, opt = _trained(tiny_config)
    folder = tmp_path / "checkpoints" / "step_000003"
    ckpt.write_checkpoint(_snapshot(model, opt), folder)
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.toml", "model.safetensors", "optimizer.safetensors", "state.json", "tokenizer.json"]
    assert not list(tmp_path.rglob("*.tmp"))
    pieces = ckpt.read_checkpoint(folder)
    fresh = GPT(tiny_config)
    missing, unexpected = fresh.load_state_dict(pieces["model"], strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied to wte, stored once
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert "transformer.wte.weight.exp_avg" in load_file(folder / "optimizer.safetensors")  # keyed by name
    opt2 = build_optimizer(fresh, OptimConfig(), lr=1e-3)
    load_optimizer_state(fresh, opt2, pieces["optimizer"])
    params1 = [p for g in opt.param_groups for p in g["params"]]
    params2 = [p for g in opt2.param_groups for p in g["params"]]
    for p1, p2 in zip(params1, params2, strict=True):
        s1, s2 = opt.state[p1], opt2.state[p2]
        assert all(torch.equal(s1[k], s2[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    assert pieces["state"]["train"]["step"] == 3 and pieces["state"]["loader"]["position"] == 7


def test_snapshot_is_a_copy_not_the_live_tensors(tiny_config):
    model, opt = _trained(tiny_config)
    snapshot = _snapshot(model, opt)
    before = snapshot.model["transformer.h.0.attn.c_attn.weight"].clone()
    model(torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))).backward()
    opt.step()  # training goes on while the background thread writes
    assert torch.equal(snapshot.model["transformer.h.0.attn.c_attn.weight"], before)


def test_index_keyed_format_1_optimizer_state_maps_to_names(tiny_config):
    model, opt = _trained(tiny_config)
    names = list_param_names(model, opt)
    assert names[0] == "transformer.wte.weight" and "lm_head.weight" not in names  # tied: listed once
    indexed = opt.state_dict()
    _, named = gather_state(model, opt, is_main=True)
    round_trip = key_by_index(named, names)
    assert round_trip["state"].keys() == indexed["state"].keys()
    for i, per_param in indexed["state"].items():
        assert all(torch.equal(per_param[k], round_trip["state"][i][k]) for k in per_param)


def test_rng_state_restored(tmp_path):
    rng = ckpt.capture_rng()
    a = torch.rand(5)
    ckpt.restore_rng(rng)
    assert torch.equal(torch.rand(5), a)


def test_background_writer_overwrites_atomically_and_prunes(tiny_config, tmp_path):
    model, opt = _trained(tiny_config)
    writer = ckpt.CheckpointWriter()
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        writer.submit(_snapshot(model, opt, step), [root / f"step_{step:06d}"], keep_last=2)
    writer.submit(_snapshot(model, opt, 5), [root / "best"])
    writer.submit(_snapshot(model, opt, 6), [root / "best"])
    writer.wait()
    assert sorted(p.name for p in root.iterdir()) == ["best", "step_000003", "step_000004"]
    assert ckpt.read_checkpoint(root / "best")["state"]["train"]["step"] == 6
    assert ckpt.resolve_checkpoint_dir(tmp_path) == root / "step_000004"
    assert ckpt.latest_checkpoint_dir(tmp_path) == root / "best"


def test_a_save_before_any_update_leaves_the_optimizer_untouched(tiny_config):
    model = GPT(tiny_config)
    opt = build_optimizer(model, OptimConfig(), lr=1e-3)
    model_sd, optim_sd = gather_state(model, opt, is_main=True)
    assert not opt.state and optim_sd["state"] == {}  # no zero-lr step was taken to create the state
    assert optim_sd["param_groups"][0]["params"][0] == "transformer.wte.weight"
    tensors, meta = ckpt.split_optimizer_state(optim_sd)
    fresh = GPT(tiny_config)
    opt2 = build_optimizer(fresh, OptimConfig(), lr=1e-3)
    load_optimizer_state(fresh, opt2, ckpt.join_optimizer_state(tensors, meta))
    assert not opt2.state and model_sd.keys() == {k for k in model.state_dict() if k != "lm_head.weight"}


def test_a_resume_keeps_the_vocabulary_padding_it_was_trained_with():
    default = RunConfig()
    padded = replace(default, model=replace(default.model, vocab_size=65, vocab_multiple=64))  # before auto padding
    assert check_resume_config(default, to_toml(padded), is_main=True).model.vocab_multiple == 64
    same_rows = replace(default, model=replace(default.model, vocab_multiple=128))  # 65 -> 128 rows either way
    assert check_resume_config(same_rows, to_toml(padded), is_main=True).model.vocab_multiple == 64
    other = replace(default, model=replace(default.model, vocab_multiple=8))
    with pytest.raises(UserError, match="its embedding has 128 rows .65 tokens, model.vocab_multiple 64., not 72"):
        check_resume_config(other, to_toml(padded), is_main=True)
