"""Hugging Face transformers GPT-2 folders in and out: export_hf writes what GPT2LMHeadModel and AutoTokenizer
load without gptrain, import_hf reads a local folder or a Hub model (safetensors only) into a gptrain
checkpoint, resolve_hf finds one. transformers is never imported: config.json and the weights are written
by hand. gptrain's GPT already uses GPT-2's parameter names; HF's Conv1D stores (in, out), nn.Linear (out, in)."""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import gptrain
from gptrain.config import RunConfig, from_toml_text
from gptrain.errors import UserError
from gptrain.files import fsync_dir, fsync_file, swap_in
from gptrain.interop import write_model_folder
from gptrain.interop.hf_tokenizer import GPT2_VOCAB_SIZE, read_hf_tokenizer, write_hf_tokenizer
from gptrain.metrics.runs import read_jsonl
from gptrain.model.gpt import GPT, ModelConfig
from gptrain.tokenizer import Tokenizer, load_tokenizer
from gptrain.tokenizer.gpt2 import GPT2Tokenizer
from gptrain.train.checkpoint import load_model_weights, read_checkpoint, resolve_checkpoint_dir

CONV1D_WEIGHTS = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
HF_BUFFERS = (".attn.bias", ".attn.masked_bias")  # the causal mask older transformers saved with the weights
# model/gpt.py's MLP computes F.gelu(approximate="tanh"), which HF calls gelu_new (GPT-2's own, written out),
# gelu_pytorch_tanh (the same torch kernel) or gelu_fast (the same formula, constants rounded).
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
LAYER_NORM_EPS = 1e-5  # model/gpt.py's LayerNorm
# Top-level files only: Hub repos also hold onnx/, flax and TF copies that a *.json or *.safetensors glob would take.
HUB_FILES = ["config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
             "model-*.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "vocab.json", "merges.txt"]
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def export_hf(checkpoint: str | Path, out: Path) -> Path:
    """A transformers GPT-2 folder (model.safetensors, config.json, generation_config.json, tokenizer
    files, README.md) from a gptrain checkpoint or run directory; written whole or not at all."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty: choose another --out")
    folder = resolve_checkpoint_dir(checkpoint)
    pieces = read_checkpoint(folder, with_optimizer=False)
    cfg = from_toml_text(pieces["config_toml"])
    tokenizer = load_tokenizer(pieces["tokenizer_path"])
    model_cfg = replace(cfg.model, vocab_size=tokenizer.vocab_size)
    model = GPT(model_cfg)
    load_model_weights(model, pieces["model"], folder)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(to_hf_weights(model.state_dict(), model_cfg), str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        _write_json(tmp / "config.json", hf_config(model_cfg, tokenizer))
        _write_json(tmp / "generation_config.json", {"_from_model_config": True, "bos_token_id": tokenizer.eot_id,
                                                     "eos_token_id": tokenizer.eot_id})
        described = write_hf_tokenizer(tokenizer, tmp, model_cfg.block_size)
        (tmp / "README.md").write_text(model_card(folder, cfg, pieces["state"], described), encoding="utf-8")
        for f in tmp.iterdir():
            fsync_file(f)
        fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    swap_in(tmp, out)
    return out


def to_hf_weights(state: dict[str, torch.Tensor], model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A GPT's state_dict in GPT2LMHeadModel's layout: Conv1D weights transposed, vocab rows cut to the real
    vocabulary, the tied head left out, zero biases where gptrain has none (bias=false computes the same)."""
    out = {}
    for name, t in state.items():
        if name == "lm_head.weight" and model_cfg.tie_weights:
            continue
        t = t.detach().to(torch.float32)
        if name in ("transformer.wte.weight", "lm_head.weight"):
            t = t[: model_cfg.vocab_size]
        elif name.endswith(CONV1D_WEIGHTS):
            t = t.t()
        out[name] = t.contiguous().clone()  # no views of another tensor: safetensors refuses shared storage
    for name, t in list(out.items()):
        bias = name.removesuffix("weight") + "bias"
        if name.endswith(".weight") and ".h." in name or name == "transformer.ln_f.weight":
            width = t.shape[1] if name.endswith(CONV1D_WEIGHTS) else t.shape[0]
            out.setdefault(bias, torch.zeros(width))
    return out


def hf_config(model_cfg: ModelConfig, tokenizer: Tokenizer) -> dict:
    """config.json for GPT2LMHeadModel computing what gptrain's GPT computes."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": tokenizer.vocab_size,
        "n_positions": model_cfg.block_size, "n_embd": model_cfg.n_embd, "n_layer": model_cfg.n_layer,
        "n_head": model_cfg.n_head, "n_inner": None, "activation_function": "gelu_new",
        "resid_pdrop": model_cfg.dropout, "embd_pdrop": model_cfg.dropout, "attn_pdrop": model_cfg.dropout,
        "layer_norm_epsilon": LAYER_NORM_EPS, "initializer_range": 0.02, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False, "use_cache": True,
        "bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eot_id,
        "tie_word_embeddings": model_cfg.tie_weights, "torch_dtype": "float32",
    }


def model_card(folder: Path, cfg: RunConfig, state: dict, tokenizer_described: str) -> str:
    """README.md: where the weights come from (run, step, data, tokenizer, val loss) and how to load them."""
    train = state.get("train", {})
    run_dir = folder.resolve().parent.parent if folder.resolve().parent.name == "checkpoints" else None
    imported = state.get("imported_from")
    m = cfg.model
    rows = [("gptrain", gptrain.__version__), ("checkpoint", str(folder.resolve())),
            ("run directory", str(run_dir) if run_dir else "none (a standalone checkpoint folder)"),
            ("step", train.get("step", 0)), ("tokens seen", train.get("tokens_seen", 0)),
            ("data", "not trained by gptrain (see imported from)" if imported else cfg.data.source or "none"),
            ("dataset folder", state.get("dataset_dir") or "unknown"), ("tokenizer", tokenizer_described),
            ("sizes", f"{m.n_layer} layers, width {m.n_embd}, {m.n_head} heads, context {m.block_size}")]
    rows += [(what, f"{value:.4f}") for what, value in val_losses(folder, run_dir, train)]
    if imported:
        rows.append(("imported from", json.dumps(imported, default=str)))
    table = "\n".join(f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows)
    title = (run_dir or folder.resolve()).name
    load = ("from transformers import AutoTokenizer, GPT2LMHeadModel\n\n"
            'model = GPT2LMHeadModel.from_pretrained("path/to/this/folder")\n'
            'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")\n')
    return ("---\nlibrary_name: transformers\npipeline_tag: text-generation\ntags: [gptrain, gpt2]\n---\n\n"
            f"# {title}\n\nA GPT-2 style model from gptrain, exported with `gptrain export --format hf`.\n\n"
            f"| | |\n|---|---|\n{table}\n\n```python\n{load}```\n")


def val_losses(folder: Path, run_dir: Path | None, train: dict) -> list[tuple[str, float]]:
    """The val losses the run recorded for this checkpoint: `gptrain eval` on it (eval.jsonl), the val row
    at its step (metrics.jsonl), the run's best so far (state.json)."""
    found = []
    if run_dir is not None:
        full = [r for r in read_jsonl(run_dir / "eval.jsonl")[0]
                if r.get("kind") == "eval" and r.get("checkpoint") == str(folder.resolve())]
        if full and isinstance(full[-1].get("val_loss"), float):
            found.append(("val loss (whole split, gptrain eval)", full[-1]["val_loss"]))
        at_step = [r for r in read_jsonl(run_dir / "metrics.jsonl")[0]
                   if r.get("kind") == "val" and r.get("step") == train.get("step")]
        if at_step and isinstance(at_step[-1].get("val_loss"), float):
            found.append((f"val loss at step {train.get('step')} (sampled windows)", at_step[-1]["val_loss"]))
    if isinstance(train.get("best_val_loss"), float):
        found.append(("best val loss of the run", train["best_val_loss"]))
    return found


def import_hf(source: str | Path, out: Path, tokenizer: str | None = None) -> Path:
    """A gptrain checkpoint folder from a transformers GPT-2 model: a local folder or a Hub name
    (`owner/name[@revision]`); tokenizer: a gptrain tokenizer.json for a model without a usable one."""
    folder = resolve_hf(source)
    if folder is None:
        raise UserError(f"{source} is neither a Hugging Face GPT-2 folder (config.json with model_type gpt2) "
                        "nor a model on the Hub")
    config = read_hf_config(folder)
    model_cfg = model_config_from_hf(config, folder)
    weights = from_hf_weights(read_safetensors(folder), model_cfg.tie_weights)
    check_names(weights, model_cfg, folder)
    chosen = choose_tokenizer(folder, weights["transformer.wte.weight"].shape[0], tokenizer)
    provenance = {"format": "hf", "source": str(source), "path": str(Path(folder).resolve()),
                  "tokenizer": chosen.name} | hub_origin(Path(folder))
    return write_model_folder(out, model_cfg, weights, chosen, provenance)


def read_hf_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{folder} has no config.json: not a Hugging Face model folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a transformers config (not a JSON object)")
    return config


def model_config_from_hf(config: dict, where: Path) -> ModelConfig:
    """gptrain's ModelConfig for a GPT2Config, or a UserError naming each setting gptrain does not compute."""
    if config.get("model_type") != "gpt2":
        raise UserError(f"{where} is a Hugging Face {config.get('model_type')!r} model; gptrain imports GPT-2 "
                        "models (model_type gpt2) only")
    n_embd = int(config.get("n_embd", 768))
    problems = []
    activation = config.get("activation_function", "gelu_new")
    if activation not in TANH_GELUS:
        problems.append(f"activation_function={activation!r} (gptrain computes the tanh GELU, gelu_new)")
    if config.get("n_inner") not in (None, 4 * n_embd):
        problems.append(f"n_inner={config['n_inner']} (gptrain's MLP is 4 * n_embd = {4 * n_embd} wide)")
    if not math.isclose(float(config.get("layer_norm_epsilon", LAYER_NORM_EPS)), LAYER_NORM_EPS, rel_tol=1e-6):
        problems.append(f"layer_norm_epsilon={config['layer_norm_epsilon']} (gptrain's is {LAYER_NORM_EPS})")
    if not config.get("scale_attn_weights", True):
        problems.append("scale_attn_weights=false (gptrain scales attention by 1/sqrt(head size))")
    # reorder_and_upcast_attn is accepted: it changes the precision of the same attention, not what it computes.
    for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if config.get(key):
            problems.append(f"{key}=true")
    if problems:
        raise UserError(f"{where}: gptrain cannot compute this GPT-2 variant: {'; '.join(problems)}")
    return ModelConfig(n_embd=n_embd, n_layer=int(config.get("n_layer", 12)), n_head=int(config.get("n_head", 12)),
                       block_size=int(config.get("n_positions", config.get("n_ctx", 1024))),
                       vocab_size=int(config.get("vocab_size", GPT2_VOCAB_SIZE)),
                       tie_weights=bool(config.get("tie_word_embeddings", True)))


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of model.safetensors, or of the shards model.safetensors.index.json lists (never pickle)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise UserError(f"{folder} has no model.safetensors: gptrain reads safetensors weights only, never pickle "
                        "(.bin, .pt); convert them with transformers' save_pretrained(safe_serialization=True)")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            tensors |= load_file(str(folder / name))
        except (FileNotFoundError, SafetensorError) as e:
            raise UserError(f"{folder / name} cannot be read as safetensors ({e})") from None
    return tensors


def from_hf_weights(tensors: dict[str, torch.Tensor], is_tied: bool) -> dict[str, torch.Tensor]:
    """HF GPT-2 tensors in gptrain's names and shapes; both layouts: `transformer.`-prefixed (save_pretrained)
    and bare (`h.0.attn.c_attn.weight`, the Hub's original GPT-2 files, with their attn.bias buffers)."""
    out = {}
    for key, t in tensors.items():
        name = key if key.startswith("transformer.") or key.startswith("lm_head.") else f"transformer.{key}"
        if name.endswith(HF_BUFFERS) or (is_tied and name == "lm_head.weight"):
            continue
        t = t.to(torch.float32)
        out[name] = t.t().contiguous() if name.endswith(CONV1D_WEIGHTS) else t
    return out


def check_names(weights: dict[str, torch.Tensor], model_cfg: ModelConfig, where: Path) -> None:
    """A UserError unless weights has exactly the tensors a GPT of model_cfg holds (shapes: write_model_folder)."""
    with torch.device("meta"):
        expected = set(GPT(model_cfg).state_dict())
    if model_cfg.tie_weights:
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        detail = "; ".join(filter(None, [f"missing {', '.join(missing[:3])}" if missing else "",
                                         f"unexpected {', '.join(unexpected[:3])}" if unexpected else ""]))
        raise UserError(f"{where}: the weights are not those of the GPT-2 its config.json describes ({detail})")


def choose_tokenizer(folder: Path, num_rows: int, tokenizer: str | None) -> Tokenizer:
    """The given gptrain tokenizer.json, else the folder's own tokenizer, else GPT-2's for a 50257 vocabulary."""
    if tokenizer is not None:
        chosen = load_tokenizer(Path(tokenizer).expanduser())
    else:
        chosen = read_hf_tokenizer(Path(folder))
        if chosen is None and num_rows != GPT2_VOCAB_SIZE:
            raise UserError(f"{folder} has no tokenizer files and {num_rows} vocabulary rows (GPT-2 has "
                            f"{GPT2_VOCAB_SIZE}): pass the gptrain tokenizer.json it was trained with (--tokenizer)")
        chosen = chosen or GPT2Tokenizer()
    if chosen.vocab_size > num_rows:
        raise UserError(f"the {chosen.name} tokenizer has {chosen.vocab_size} ids but the model in {folder} only "
                        f"{num_rows} embedding rows: it is not this model's tokenizer")
    return chosen


def hub_origin(folder: Path) -> dict:
    """repo_id and revision (the commit) of a folder in huggingface_hub's cache (models--o--n/snapshots/<sha>)."""
    parts = folder.resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return {"repo_id": parts[-3].removeprefix("models--").replace("--", "/"), "revision": parts[-1]}
    return {"revision": None}


def resolve_hf(source: str | Path) -> Path | None:
    """A Hugging Face GPT-2 folder for source: a local folder with config.json, else a Hub name
    (`owner/name[@revision]`) fetched into huggingface_hub's cache; None when source is neither (a path
    that is not such a folder, a name the Hub does not have), so the caller can try other kinds."""
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file() or (path / "state.json").is_file():
            return None  # not HF's, or a gptrain checkpoint folder
        config = read_hf_config(path)
        if "model_type" not in config:
            return None
        model_config_from_hf(config, path)  # another architecture is refused here, clearly
        return path
    name, _, revision = str(source).partition("@")
    if not _REPO_ID.fullmatch(name) or name.endswith((".json", ".safetensors", ".bin", ".pt")):
        return None
    return fetch_from_hub(name, revision or None)


def fetch_from_hub(repo_id: str, revision: str | None) -> Path | None:
    """The snapshot folder of a Hub GPT-2 model (its config checked before the weights are fetched); None when
    the Hub has no such repository. huggingface_hub's HF_HUB_CACHE, HF_HUB_OFFLINE and HF_ENDPOINT apply."""
    import httpx2  # huggingface_hub's HTTP client: its transport errors are not OSErrors
    from huggingface_hub import constants, hf_hub_download, snapshot_download
    from huggingface_hub import errors as hf

    where = f"{repo_id}@{revision or 'main'}"
    try:
        config = read_hf_config(Path(hf_hub_download(repo_id, "config.json", revision=revision)).parent)
        model_config_from_hf(config, Path(where))
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES))
    except hf.GatedRepoError:
        raise UserError(f"{where} is gated on {constants.ENDPOINT}: accept its terms and log in (`hf auth login`)") \
            from None
    except hf.RepositoryNotFoundError:
        return None
    except hf.RevisionNotFoundError:
        raise UserError(f"{where}: {repo_id} has no revision {revision!r} on {constants.ENDPOINT}") from None
    except hf.RemoteEntryNotFoundError:
        raise UserError(f"{where} has no config.json: not a transformers model") from None
    except (OSError, httpx2.HTTPError) as e:
        if constants.is_offline_mode():
            raise UserError(f"{repo_id} is not a local folder, and no Hub model of that name is in the cache "
                            f"{constants.HF_HUB_CACHE} (HF_HUB_OFFLINE=1: unset it to download)") from None
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{repo_id} is not a local folder, and fetching it from {constants.ENDPOINT} failed "
                        f"({detail}); check the name, the network or HF_ENDPOINT") from None


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
