"""nanoGPT's train.py checkpoints (ckpt.pt) into gptrain checkpoint folders, read with weights_only: no
pickled code runs. Parameter names are the same as gptrain's (both follow Hugging Face GPT-2, nn.Linear out x in).

One difference stays: nanoGPT's MLP uses the exact GELU (nn.GELU(), erf) and gptrain's the tanh
approximation that GPT-2 and llm.c use, so an imported model's logits differ slightly from nanoGPT's.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from gptrain.errors import UserError
from gptrain.interop import write_model_folder
from gptrain.model.gpt import ModelConfig
from gptrain.tokenizer import Tokenizer, load_tokenizer

COMPILED_PREFIX = "_orig_mod."  # what torch.compile's wrapper adds to every name (nanoGPT saves the wrapper's)
GPT2_ROWS = (50257, 50304)  # GPT-2's vocabulary, and nanoGPT's default padding of it to a multiple of 64
GELU_NOTE = ("nanoGPT's MLP uses the exact GELU (erf); gptrain's uses the tanh approximation (as GPT-2 and "
             "llm.c do): the imported model's logits differ slightly from nanoGPT's")


def import_nanogpt(ckpt_path: Path, out: Path, tokenizer: str | None = None) -> Path:
    """A gptrain checkpoint folder at out from nanoGPT's ckpt.pt. tokenizer: "gpt2" or a gptrain
    tokenizer.json; by default GPT-2's when the model has GPT-2's vocabulary (50257 or 50304 rows)."""
    ckpt_path = Path(ckpt_path)
    ckpt = load_checkpoint(ckpt_path)
    model_cfg = model_config(ckpt["model_args"], ckpt_path)
    weights, notes = nanogpt_weights(ckpt["model"], ckpt_path)
    rows = weights["transformer.wte.weight"].shape[0]
    tok, tok_source = _resolve_tokenizer(tokenizer, rows, ckpt.get("config"), ckpt_path)
    notes += check_vocab_rows(tok, rows, ckpt_path)
    provenance = {"format": "nanoGPT", "file": str(ckpt_path.resolve()), "iter_num": _plain(ckpt.get("iter_num")),
                  "best_val_loss": _plain(ckpt.get("best_val_loss")), "model_args": _plain(ckpt["model_args"]),
                  "config": _plain(ckpt.get("config")), "tokenizer": tok_source, "notes": [GELU_NOTE, *notes]}
    return write_model_folder(out, model_cfg, weights, tok, provenance)


def load_checkpoint(path: Path) -> dict:
    """nanoGPT's checkpoint dict, loaded with weights_only=True; a file that needs code to load is refused."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"nanoGPT checkpoint {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a folder: give nanoGPT's ckpt.pt file") from None
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            raise UserError(f"{path} needs more than weights_only loading (it holds {found.group(1)}); gptrain "
                            "never unpickles code: save a checkpoint of plain tensors, dicts and numbers") from None
        raise UserError(f"{path} is not a PyTorch checkpoint that torch.load can read") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise UserError(f"{path} is not a PyTorch checkpoint that torch.load can read ({e})") from None
    if not isinstance(ckpt, dict) or not {"model", "model_args"} <= ckpt.keys():
        keys = sorted(ckpt)[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"{path} is not a nanoGPT train.py checkpoint (no 'model' and 'model_args'; found {keys})")
    return ckpt


def model_config(args: dict, path: Path) -> ModelConfig:
    """gptrain's ModelConfig for nanoGPT's model_args (the vocabulary comes from the tokenizer later)."""
    needed = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")
    missing = [k for k in needed if k not in args]
    if missing:
        raise UserError(f"{path}: model_args lacks {', '.join(missing)}")
    return ModelConfig(n_layer=int(args["n_layer"]), n_head=int(args["n_head"]), n_embd=int(args["n_embd"]),
                       block_size=int(args["block_size"]), bias=bool(args["bias"]),
                       dropout=float(args.get("dropout") or 0.0), tie_weights=True)


def nanogpt_weights(state_dict: dict, path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict in gptrain's names, fp32: the compile prefix stripped, the causal-mask buffers
    (`attn.bias`, saved where flash attention is missing) dropped, the tied head stored once."""
    weights, notes = {}, []
    for name, t in state_dict.items():
        name = name.removeprefix(COMPILED_PREFIX)
        if re.fullmatch(r"transformer\.h\.\d+\.attn\.bias", name):
            continue  # torch.tril mask, not a parameter
        if not isinstance(t, torch.Tensor):
            raise UserError(f"{path}: model entry {name} is not a tensor")
        if t.dtype != torch.float32:
            notes.append(f"{t.dtype} weights widened to float32")
        weights[name] = t.to(torch.float32)
    if "transformer.wte.weight" not in weights:
        raise UserError(f"{path}: the model has no transformer.wte.weight: not a nanoGPT GPT state dict")
    head = weights.pop("lm_head.weight", None)
    if head is not None and not torch.equal(head, weights["transformer.wte.weight"]):
        raise UserError(f"{path}: lm_head.weight differs from transformer.wte.weight; nanoGPT ties them, and "
                        "gptrain imports tied models only")
    return weights, sorted(set(notes))


def _resolve_tokenizer(tokenizer: str | None, rows: int, config: object, path: Path) -> tuple[Tokenizer, str]:
    if tokenizer is None and rows not in GPT2_ROWS:
        dataset = config.get("dataset") if isinstance(config, dict) else None
        raise UserError(
            f"{path} has a vocabulary of {rows} (dataset {dataset or 'unknown'}), not GPT-2's: pass --tokenizer "
            "with a gptrain tokenizer.json for it (nanoGPT keeps a character model's alphabet in meta.pkl, a "
            "pickle gptrain does not load; see docs/interop.md)")
    if tokenizer is None or tokenizer == "gpt2":
        from gptrain.tokenizer.gpt2 import GPT2Tokenizer

        return GPT2Tokenizer(), "gpt2"
    return load_tokenizer(Path(tokenizer).expanduser()), str(tokenizer)


def check_vocab_rows(tokenizer: Tokenizer, rows: int, path: Path) -> list[str]:
    """Refuse a tokenizer that does not fit the embedding's rows. More rows than ids is padding (up to a
    multiple of 128); fewer rows is allowed only for the separator and unknown ids a gptrain character
    tokenizer adds after nanoGPT's characters: those ids get zero rows (logit 0), said in the notes."""
    V = tokenizer.vocab_size
    if V <= rows <= (V + 127) // 128 * 128:
        return []
    extra = list(range(rows, V))
    special = {tokenizer.eot_id, tokenizer.unk_id}
    if extra and len(extra) <= 2 and set(extra) <= special:
        return [f"ids {', '.join(map(str, extra))} (the tokenizer's separator / unknown id) have no row in the "
                "nanoGPT model: zero rows were added, so their logit is 0"]
    raise UserError(f"{path} has {rows} vocabulary rows but the tokenizer has {V} ids: pass the tokenizer the "
                    "model was trained with (--tokenizer)")


def _plain(value: object) -> object:
    """A JSON-friendly copy: tensors of one value become numbers, containers are walked."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
