"""Models in and out of gptrain: Hugging Face transformers folders, llm.c model files, nanoGPT
checkpoints. Every importer ends in write_model_folder: a gptrain checkpoint folder holding weights,
config, tokenizer and where they came from, which `--init-from`, `generate` and `export` all read."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from gptrain.config import RunConfig, to_toml
from gptrain.errors import UserError
from gptrain.files import swap_in, sync_folder
from gptrain.model.gpt import GPT, ModelConfig
from gptrain.tokenizer.base import Tokenizer
from gptrain.train.checkpoint import TrainState, load_model_weights


def write_model_folder(out: Path, model_cfg: ModelConfig, weights: dict[str, torch.Tensor], tokenizer: Tokenizer,
                       provenance: dict) -> Path:
    """A gptrain checkpoint folder (model.safetensors, config.toml, tokenizer.json, state.json at step 0
    with `imported_from`) from weights in gptrain's names and shapes. The weights are checked by loading
    them into a GPT of model_cfg first (vocab rows padded as gptrain pads them), so a folder that is
    written always loads; it appears whole or not at all."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already exists and is not empty: choose another --out")
    model_cfg = replace(model_cfg, vocab_size=tokenizer.vocab_size)
    model_cfg = replace(model_cfg, vocab_multiple=model_cfg.resolved_vocab_multiple)  # stored resolved, as runs are
    model = GPT(model_cfg)
    load_model_weights(model, pad_vocab(weights, model_cfg), out)
    tied = {"lm_head.weight"} if model_cfg.tie_weights else set()
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in tied}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    kind = json.loads(tokenizer.to_json()).get("gptrain_tokenizer") or "bpe"  # what --tokenizer would say
    default = RunConfig()
    tok_cfg = replace(default.tokenizer, kind=kind,
                      vocab_size=tokenizer.vocab_size if kind == "bpe" else default.tokenizer.vocab_size)
    cfg = replace(default, model=model_cfg, tokenizer=tok_cfg)
    (tmp / "config.toml").write_text(to_toml(cfg), encoding="utf-8")
    (tmp / "tokenizer.json").write_text(tokenizer.to_json(), encoding="utf-8")
    state = {"format": 2, "train": TrainState().__dict__, "is_complete": True, "imported_from": provenance}
    (tmp / "state.json").write_text(json.dumps(state, indent=1, default=str), encoding="utf-8")
    sync_folder(tmp)
    if out.exists():
        out.rmdir()
    swap_in(tmp, out)
    return out


def pad_vocab(weights: dict[str, torch.Tensor], model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Embedding (and untied head) rows cut or zero-padded to gptrain's padded vocabulary."""
    rows = model_cfg.padded_vocab_size
    out = dict(weights)
    for name in ("transformer.wte.weight", "lm_head.weight"):
        if name in out and out[name].shape[0] != rows:
            t = out[name][: min(rows, out[name].shape[0])]
            out[name] = torch.cat([t, t.new_zeros(rows - t.shape[0], t.shape[1])]) if t.shape[0] < rows else t
    return out


def resolve_model_source(source: str | Path) -> Path:
    """The gptrain checkpoint folder that `--init-from` and `generate --checkpoint` use for `source`, looked up
    in this order: a local gptrain checkpoint or run directory; a local Hugging Face folder; a Hub name
    (through huggingface_hub: its cache, HF_HUB_OFFLINE, HF_ENDPOINT). A Hugging Face model is imported
    once into $GPTRAIN_CACHE/imported/ and reused from there."""
    from gptrain.tokenizer.gpt2_assets import cache_dir
    from gptrain.train.checkpoint import resolve_checkpoint_dir

    path = Path(source)
    is_hf_folder = (path / "config.json").is_file() and not (path / "state.json").is_file()
    may_be_hub_name = not path.exists() and re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?(@[\w./-]+)?", str(source))
    if not (is_hf_folder or may_be_hub_name):
        return resolve_checkpoint_dir(path)
    from gptrain.interop.hf import import_hf, resolve_hf

    hf_folder = resolve_hf(source)
    if hf_folder is None:
        return resolve_checkpoint_dir(path)  # says it does not exist, or holds no checkpoint
    key = hashlib.sha256(str(Path(hf_folder).resolve()).encode()).hexdigest()[:12]
    target = cache_dir() / "imported" / f"{re.sub(r'[^A-Za-z0-9._-]+', '-', str(source)).strip('-')[:60]}-{key}"
    if not (target / "state.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        import_hf(hf_folder, target)
    return target
