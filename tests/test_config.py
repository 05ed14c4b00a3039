import pytest

from gptrain.config import RunConfig, apply_overrides, from_toml_text, resolve_config, to_toml
from gptrain.errors import UserError


def test_defaults_round_trip_through_toml():
    cfg = apply_overrides(RunConfig(), {"model.dropout": "0.1", "samples.prompt": 'say "hi"\n'})
    assert from_toml_text(to_toml(cfg)) == cfg


def test_recipe_env_dotenv_and_cli_precedence(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('preset = "feste-tiny"\n[model]\nn_layer = 3\ndropout = 0.2\n[train]\nnum_steps = 50\n')
    dotenv = tmp_path / ".env"
    dotenv.write_text("GPTRAIN_TRAIN__NUM_STEPS=60\nGPTRAIN_LR=0.01\n")
    environ = {"GPTRAIN_STEPS": "70", "GPTRAIN_MODEL__DROPOUT": "0.3", "UNRELATED": "x"}
    cfg = resolve_config(recipe, {"steps": 80}, environ=environ, dotenv_path=dotenv)
    assert cfg.preset == "feste-tiny"
    assert (cfg.model.n_embd, cfg.model.n_head, cfg.tokenizer.vocab_size) == (64, 1, 512)  # from the preset
    assert cfg.model.n_layer == 3  # the recipe beats the preset
    assert cfg.schedule.peak_lr == 0.01  # .env
    assert cfg.model.dropout == 0.3  # environment beats recipe
    assert cfg.train.num_steps == 80  # flags beat everything


def test_aliases_match_config_fields():
    cfg = resolve_config(None, {"embd": 96, "layers": 3, "heads": 4, "context": 32, "vocab": 700, "lr": 1e-3,
                                "batch-size": 5, "epochs": 2.5, "model-size": "spider"}, environ={})
    assert (cfg.model.n_embd, cfg.model.n_layer, cfg.model.n_head, cfg.model.block_size) == (96, 3, 4, 32)
    assert (cfg.tokenizer.vocab_size, cfg.schedule.peak_lr, cfg.train.batch_size) == (700, 1e-3, 5)
    assert cfg.train.num_epochs == 2.5 and cfg.preset == "spider"


@pytest.mark.parametrize("values,message", [
    ({"model.n_embdd": 3}, "unknown config key 'model.n_embdd'"),
    ({"modle.n_embd": 3}, "unknown config key"),
    ({"model.n_embd": "wide"}, "model.n_embd expects int"),
    ({"model.bias": "maybe"}, "expects true or false"),
    ({"model.n_embd": 100, "model.n_head": 3}, "not divisible"),
    ({"preset": "gpt5"}, "unknown preset 'gpt5'"),
    ({"lr": "nan"}, "schedule.peak_lr must be a finite number"),
    ({"optim.grad_clip": "inf"}, "optim.grad_clip must be a finite number"),
    ({"seed": "-1"}, "seed must be >= 0"),
    ({"schedule.decay_fraction": "0"}, r"schedule.decay_fraction must be in \(0, 1\]"),
    ({"eval.every_steps": 100, "eval.hellaswag_every_steps": 150}, "must be a multiple of eval.every_steps"),
    ({"eval.every_steps": 0, "eval.hellaswag_every_steps": 100}, "must be a multiple of eval.every_steps"),
    ({"eval.hellaswag_limit": -1}, "eval.hellaswag_every_steps and eval.hellaswag_limit must be >= 0"),
])
def test_bad_values_are_user_errors(values, message):
    with pytest.raises(UserError, match=message):
        resolve_config(None, values, environ={})


def test_every_preset_resolves():
    from gptrain.presets import PRESETS

    for name, preset in PRESETS.items():
        cfg = resolve_config(None, {"preset": name}, environ={})
        assert cfg.model.n_embd == preset.n_embd and cfg.model.block_size == preset.block_size


def test_toml_strings_with_control_characters_round_trip():
    cfg = apply_overrides(RunConfig(), {"samples.prompt": "a\x7fb\r\t\x01 ünï ✓", "name": 'q"uote\\'})
    assert from_toml_text(to_toml(cfg)) == cfg


def test_the_hellaswag_url_variable_is_not_mistaken_for_a_config_key():
    cfg = resolve_config(None, {}, environ={"GPTRAIN_HELLASWAG_URL": "http://127.0.0.1:1/h.jsonl",
                                            "GPTRAIN_EVAL__HELLASWAG_EVERY_STEPS": "200"})
    assert cfg.eval.hellaswag_every_steps == 200
    with pytest.raises(UserError, match="unknown setting GPTRAIN_HELLASWAG_URLS"):
        resolve_config(None, {}, environ={"GPTRAIN_HELLASWAG_URLS": "x"})


def test_the_switches_read_outside_the_config_are_not_mistaken_for_config_keys():
    from gptrain.metrics.throughput import SPEED_CACHE_ENV
    from gptrain.model.cpu_kernels import ENV as CPU_KERNELS_ENV

    environ = {CPU_KERNELS_ENV: "0", SPEED_CACHE_ENV: "/tmp/x", "GPTRAIN_ONEDNN_LINEAR": "0", "GPTRAIN_LR": "0.01"}
    assert resolve_config(None, {}, environ=environ).schedule.peak_lr == 0.01


def test_other_trainers_names_work_in_flags_and_a_dotenv_file(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("TRAIN_DATA_PATH=corpus.txt\nEVAL_DATA_PATH=val.txt\nCHECKPOINT_DIR=runs/mine\nEPOCHS=2\n"
                      "BATCH_SIZE=7\nLEARNING_RATE=0.002\nGPTRAIN_TRAIN__BATCH_SIZE=9\n")
    cfg = resolve_config(None, {}, environ={"BATCH_SIZE": "99", "LEARNING_RATE": "1"}, dotenv_path=dotenv)
    assert (cfg.data.source, cfg.data.val_source, cfg.run_dir) == ("corpus.txt", "val.txt", "runs/mine")
    assert cfg.train.num_epochs == 2 and cfg.schedule.peak_lr == 0.002  # bare keys from .env, never the shell
    assert cfg.train.batch_size == 9  # a GPTRAIN_ key in the same file beats the bare one
    cfg = resolve_config(None, {"steps": 50}, environ={}, dotenv_path=dotenv)
    assert cfg.train.num_steps == 50 and cfg.train.num_epochs == 0  # --steps on the command line beats EPOCHS
    from gptrain.cli import _config_values, build_parser, split_dotted

    rest, dotted = split_dotted(["train", "--learning-rate", "3e-4", "--train-path", "a.txt", "--eval-path", "b.txt",
                                 "--checkpoint-dir", "runs/x"])
    args = build_parser().parse_args(rest)
    cfg = resolve_config(None, _config_values(args, dotted) | {"run_dir": args.run_dir}, environ={})
    assert (cfg.schedule.peak_lr, cfg.data.source, cfg.data.val_source, cfg.run_dir) == (3e-4, "a.txt", "b.txt",
                                                                                           "runs/x")
