"""--init-from keeps the checkpoint's shape and tokenizer: conflicting sizes or tokenizers are refused, a
smaller context crops the position table (with a note)."""

from __future__ import annotations

import pytest
import torch

from gptrain import Checkpoint, resolve_config, train
from gptrain.errors import UserError


def _values(tmp_path, corpus_dir, run, **extra):
    return {"data.source": str(corpus_dir), "data.data_dir": str(tmp_path / "ds"), "tokenizer.kind": "char",
            "embd": 16, "layers": 1, "heads": 2, "context": 32, "batch-size": 4, "steps": 3, "eval.every_steps": 0,
            "samples.every_steps": 0, "log.live": "off", "log.is_quiet": True, "run_dir": str(tmp_path / run)} | extra


def test_a_smaller_context_crops_the_position_table_and_conflicts_are_refused(tmp_path, corpus_dir):
    train(resolve_config(None, _values(tmp_path, corpus_dir, "base"), environ={}), log=lambda *_: None)
    base = Checkpoint.load(tmp_path / "base")
    notes = []
    overrides = {"data.source": str(corpus_dir), "context": 16, "steps": 2, "run_dir": str(tmp_path / "crop")}
    cfg = resolve_config(None, _values(tmp_path, corpus_dir, "crop", context=16, steps=2), environ={})
    train(cfg, init_from=tmp_path / "base", overrides=overrides, log=notes.append)
    assert any("cropped from 32 to 16 positions" in str(n) for n in notes)
    tuned = Checkpoint.load(tmp_path / "crop")
    assert tuned.config.model.block_size == 16 and tuned.model.transformer.wpe.weight.shape[0] == 16
    for extra, message in [({"context": 64}, "has 32 positions: --context 64 needs more"),
                           ({"tokenizer.kind": "gpt2"}, r"keeps the checkpoint.s tokenizer \(char\)"),
                           ({"embd": 32, "heads": 2}, "its model.n_embd is 16, not 32")]:
        cfg = resolve_config(None, _values(tmp_path, corpus_dir, "no", **extra), environ={})
        explicit = {"data.source": 1, "run_dir": 1} | extra
        with pytest.raises(UserError, match=message):
            train(cfg, init_from=tmp_path / "base", overrides=explicit, log=lambda *_: None)
        assert not (tmp_path / "no").exists()
    # From the Python API (no overrides): values equal to the checkpoint's are no conflict.
    same = resolve_config(None, _values(tmp_path, corpus_dir, "same", **{"lr": 1e-12}), environ={})
    train(same, init_from=tmp_path / "base", log=lambda *_: None)
    kept = Checkpoint.load(tmp_path / "same").model.transformer.wpe.weight
    assert kept.shape == base.model.transformer.wpe.weight.shape
    assert torch.allclose(kept, base.model.transformer.wpe.weight, atol=1e-6)  # started from the base weights


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_an_imported_model_s_config_names_its_tokenizer(tmp_path, kind):
    """So `--init-from IMPORTED --tokenizer KIND` (the README's GPT-2 command, with gpt2) is no conflict."""
    from gptrain.config import from_toml_text
    from gptrain.interop import write_model_folder
    from gptrain.model.gpt import GPT, ModelConfig
    from gptrain.tokenizer import TokenizerConfig, build_tokenizer
    from gptrain.train.setup import config_for_init

    text = ["the quick brown fox jumps over the lazy dog " * 20]
    tokenizer = build_tokenizer(TokenizerConfig(kind=kind, vocab_size=300), text)
    model_cfg = ModelConfig(n_embd=16, n_layer=1, n_head=2, block_size=8, vocab_size=tokenizer.vocab_size)
    folder = write_model_folder(tmp_path / "imported", model_cfg, GPT(model_cfg).state_dict(), tokenizer, {})
    saved = (folder / "config.toml").read_text()
    assert from_toml_text(saved).tokenizer.kind == kind
    cfg = resolve_config(None, {"tokenizer.kind": kind, "tokenizer.vocab_size": tokenizer.vocab_size}, environ={})
    tuned, _ = config_for_init(cfg, saved, {"transformer.wpe.weight": torch.zeros(8, 16)},
                               {"tokenizer.kind", "tokenizer.vocab_size"}, print)
    assert tuned.tokenizer.kind == kind
