"""nanoGPT checkpoints: saved here the way nanoGPT's train.py saves ckpt.pt (a compiled model's names, the
optimizer, model_args...), imported, and compared with a forward pass written after nanoGPT's model.py."""

from __future__ import annotations

import json
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

from gptrain.api import Checkpoint
from gptrain.errors import UserError
from gptrain.interop.nanogpt import import_nanogpt
from gptrain.model.gpt import GPT, ModelConfig
from gptrain.tokenizer import TokenizerConfig, build_tokenizer
from gptrain.tokenizer.base import save_tokenizer

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\nAll:\nSpeak, speak.\n"


def nanogpt_state_dict(model: GPT, rows: int, *, has_mask: bool) -> OrderedDict:
    """A gptrain model's weights as nanoGPT's GPT holds them: `rows` vocabulary rows, lm_head tied to wte
    (one tensor under both names), the causal-mask buffer `attn.bias` where flash attention is missing."""
    sd = OrderedDict()
    wte = model.transformer.wte.weight.detach()[:rows].clone()
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        sd[name] = wte if name == "transformer.wte.weight" else t.clone()
        if has_mask and name.endswith("attn.c_proj.bias"):
            T = model.config.block_size
            sd[name.replace("c_proj.bias", "bias")] = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
    sd["lm_head.weight"] = wte
    return sd


def save_like_nanogpt(path, model: GPT, rows: int, *, has_mask: bool = False, dataset: str = "openwebtext"):
    """torch.save of train.py's checkpoint dict; raw_model is the torch.compile wrapper (`_orig_mod.` names)."""
    cfg = model.config
    sd = nanogpt_state_dict(model, rows, has_mask=has_mask)
    params = [t for k, t in sd.items() if not k.endswith("attn.bias") and k != "lm_head.weight"]
    optimizer = torch.optim.AdamW([torch.nn.Parameter(p.clone()) for p in params], lr=1e-3)
    for p in optimizer.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    optimizer.step()
    model_args = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                      bias=cfg.bias, vocab_size=rows, dropout=0.0)
    checkpoint = {"model": OrderedDict(("_orig_mod." + k, v) for k, v in sd.items()),
                  "optimizer": optimizer.state_dict(), "model_args": model_args, "iter_num": 250,
                  "best_val_loss": torch.tensor(1.4697), "config": {"dataset": dataset, "compile": True}}
    torch.save(checkpoint, path)
    return sd


def nanogpt_logits(sd: dict, n_head: int, idx, *, gelu_approximate: str = "none"):
    """nanoGPT's GPT.forward (model.py) on a state dict: manual attention, nn.GELU() (exact erf)."""
    def ln(x, prefix):
        return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd.get(prefix + ".bias"), 1e-5)

    def linear(x, prefix):
        return F.linear(x, sd[prefix + ".weight"], sd.get(prefix + ".bias"))

    B, T = idx.shape
    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:T]
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("transformer.h.")})
    mask = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
    for i in layers:
        h = f"transformer.h.{i}"
        C = x.size(-1)
        q, k, v = linear(ln(x, f"{h}.ln_1"), f"{h}.attn.c_attn").split(C, dim=2)
        q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = F.softmax(att.masked_fill(mask == 0, float("-inf")), dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        x = x + linear(y, f"{h}.attn.c_proj")
        m = F.gelu(linear(ln(x, f"{h}.ln_2"), f"{h}.mlp.c_fc"), approximate=gelu_approximate)
        x = x + linear(m, f"{h}.mlp.c_proj")
    return F.linear(ln(x, "transformer.ln_f"), sd["lm_head.weight"])


def trained_like_model(cfg: ModelConfig) -> GPT:
    """A GPT whose MLP inputs are O(1), as after training (at init they are ~0.1, where both GELUs agree)."""
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.c_fc.weight"):
                p.mul_(25)
            elif name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def compare(folder, sd, n_head, num_ids):
    """The imported model, and its largest logit difference from nanoGPT's forward (with the tanh GELU,
    then nanoGPT's exact one) over the num_ids ids both models have."""
    back = Checkpoint.load(folder, device="cpu")
    idx = torch.randint(0, num_ids, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = back.model(idx)[..., :num_ids]
        tanh = nanogpt_logits(sd, n_head, idx, gelu_approximate="tanh")[..., :num_ids]
        exact = nanogpt_logits(sd, n_head, idx)[..., :num_ids]
    return back, (ours - tanh).abs().max().item(), (ours - exact).abs().max().item()


def test_a_gpt2_vocab_checkpoint_imports_with_nanogpts_logits_up_to_the_gelu(tmp_path):
    cfg = ModelConfig(n_embd=32, n_layer=2, n_head=4, block_size=16, vocab_size=50257, bias=True)
    model = trained_like_model(cfg)
    sd = save_like_nanogpt(tmp_path / "ckpt.pt", model, 50304, has_mask=True)
    folder = import_nanogpt(tmp_path / "ckpt.pt", tmp_path / "out")
    back, diff_tanh, diff_exact = compare(folder, sd, 4, 50257)
    assert back.tokenizer.name == "gpt2"
    # The weights map exactly: with nanoGPT's GELU swapped for the tanh one the logits agree to float error.
    assert diff_tanh < 1e-4
    # With nanoGPT's own exact GELU they differ, measurably and slightly (reported in the provenance).
    print(f"max |logit diff| vs nanoGPT (exact GELU): {diff_exact:.2e}; with tanh GELU: {diff_tanh:.2e}")
    assert 1e-5 < diff_exact < 5e-2
    imported = json.loads((folder / "state.json").read_text())["imported_from"]
    assert imported["format"] == "nanoGPT" and imported["iter_num"] == 250
    assert imported["best_val_loss"] == pytest.approx(1.4697)
    assert any("exact GELU" in note for note in imported["notes"])
    # nanoGPT's padding rows are kept as its checkpoint had them; gptrain pads 50257 to 50304 too
    assert torch.equal(back.model.transformer.wte.weight, sd["transformer.wte.weight"])


def test_a_char_checkpoint_needs_a_tokenizer_and_imports_with_one(tmp_path):
    tok = build_tokenizer(TokenizerConfig(kind="char"), [TEXT])
    num_chars = len(tok.chars)  # nanoGPT's meta.pkl vocabulary: sorted(set(text)), no separator, no unknown id
    cfg = ModelConfig(n_embd=32, n_layer=1, n_head=2, block_size=16, vocab_size=tok.vocab_size, bias=False)
    model = GPT(cfg)
    sd = save_like_nanogpt(tmp_path / "ckpt.pt", model, num_chars, dataset="shakespeare_char")
    with pytest.raises(UserError, match="--tokenizer"):
        import_nanogpt(tmp_path / "ckpt.pt", tmp_path / "out")
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    folder = import_nanogpt(tmp_path / "ckpt.pt", tmp_path / "out", str(tmp_path / "tokenizer.json"))
    back, diff_tanh, diff_exact = compare(folder, sd, 2, num_chars)
    assert back.model.config.bias is False and back.tokenizer.to_json() == tok.to_json()
    assert diff_tanh < 1e-5 and diff_exact < 1e-3
    extra = back.model.transformer.wte.weight[num_chars:]
    assert not extra.any()  # the separator and unknown ids, which nanoGPT's model has no row for
    notes = json.loads((folder / "state.json").read_text())["imported_from"]["notes"]
    assert any("zero rows" in note for note in notes)


def test_a_tokenizer_of_another_size_is_refused(tmp_path):
    tok = build_tokenizer(TokenizerConfig(kind="char"), [TEXT])
    cfg = ModelConfig(n_embd=16, n_layer=1, n_head=2, block_size=8, vocab_size=200)
    save_like_nanogpt(tmp_path / "ckpt.pt", GPT(cfg), 200)
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    with pytest.raises(UserError, match="200 vocabulary rows"):
        import_nanogpt(tmp_path / "ckpt.pt", tmp_path / "out", str(tmp_path / "tokenizer.json"))


class Opaque:  # a class only unpickling code could rebuild
    pass


def test_files_that_need_code_to_load_are_refused(tmp_path):
    torch.save({"model": {}, "model_args": {}, "extra": Opaque()}, tmp_path / "code.pt")
    with pytest.raises(UserError, match="weights_only.*Opaque"):
        import_nanogpt(tmp_path / "code.pt", tmp_path / "out")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint" * 8)
    with pytest.raises(UserError, match="not a PyTorch checkpoint"):
        import_nanogpt(tmp_path / "junk.pt", tmp_path / "out")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a nanoGPT"):
        import_nanogpt(tmp_path / "other.pt", tmp_path / "out")
    with pytest.raises(UserError, match="does not exist"):
        import_nanogpt(tmp_path / "missing.pt", tmp_path / "out")
    assert not (tmp_path / "out").exists()
