"""The recipes in configs/: every one resolves, and the FineWeb seed run derives llm.c's step layout."""

from dataclasses import replace
from pathlib import Path

import pytest

from gptrain.config import resolve_config
from gptrain.train.schedule import lr_at
from gptrain.train.setup import derive_plan

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(CONFIGS.glob("*.toml"))


class StandInLoader:
    """derive_plan reads windows_per_epoch only when train.num_epochs > 0."""

    windows_per_epoch = 1


def resolve_recipe(path: Path, tmp_path: Path):
    return resolve_config(path, {}, environ={}, dotenv_path=tmp_path / "no.env")


def test_recipes_are_found():
    assert CONFIGS / "gpt2_124m_fineweb.toml" in RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_resolves(path, tmp_path):
    cfg = resolve_recipe(path, tmp_path)
    assert cfg.train.num_steps >= 1


@pytest.mark.parametrize("world_size, num_micro_steps, strategy", [(1, 8, "none"), (8, 1, "zero1")])
def test_fineweb_plan(world_size, num_micro_steps, strategy, tmp_path):
    cfg = resolve_recipe(CONFIGS / "gpt2_124m_fineweb.toml", tmp_path)
    plan = derive_plan(cfg, StandInLoader(), world_size)
    assert plan.num_micro_steps == num_micro_steps
    assert plan.tokens_per_step == 524288 == 64 * 1024 * 8
    assert plan.num_steps == 19073
    assert plan.strategy == strategy
    assert plan.world_size == world_size


def test_fineweb_recipe_matches_llmc(tmp_path):
    cfg = resolve_recipe(CONFIGS / "gpt2_124m_fineweb.toml", tmp_path)
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.block_size) == (12, 12, 768, 1024)
    assert replace(cfg.model, vocab_size=50257).padded_vocab_size == 50304  # llm.c's padded vocabulary
    assert (cfg.tokenizer.kind, cfg.model.vocab_multiple, cfg.model.dropout, cfg.model.bias) == ("gpt2", 128, 0.0, True)
    assert (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.weight_decay, cfg.optim.grad_clip) == (0.9, 0.95, 0.1, 1.0)
    assert (cfg.eval.every_steps, cfg.eval.num_tokens) == (250, 20 * 64 * 1024 * 8)
    assert (cfg.checkpoint.every_steps, cfg.samples.every_steps, cfg.samples.num_tokens) == (5000, 20000, 144)
    assert cfg.parallel.strategy == "zero1"


def test_fineweb_schedule(tmp_path):
    cfg = resolve_recipe(CONFIGS / "gpt2_124m_fineweb.toml", tmp_path)
    num_steps = derive_plan(cfg, StandInLoader(), 8).num_steps
    assert cfg.schedule.kind == "cosine"
    assert lr_at(0, num_steps, cfg.schedule) == pytest.approx(6e-4 / 700)
    assert lr_at(699, num_steps, cfg.schedule) == pytest.approx(6e-4)  # warmup ends at the peak
    assert lr_at(700, num_steps, cfg.schedule) == pytest.approx(6e-4)
    assert lr_at(num_steps // 2, num_steps, cfg.schedule) < 6e-4
    assert lr_at(num_steps - 1, num_steps, cfg.schedule) == pytest.approx(0.0, abs=1e-12)  # -q 0.0: down to 0
