"""llm.c's model and tokenizer files: gptrain -> llm.c -> gptrain round trips, and files written the way
llm.c's train_gpt2.py writes them (its write_model / write_tokenizer, rewritten here) read back."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from gptrain.api import Checkpoint
from gptrain.errors import UserError
from gptrain.interop import write_model_folder
from gptrain.interop.llmc import (
    export_llmc,
    import_llmc,
    read_header,
    read_llmc_tokenizer,
    tokenizer_from_llmc,
    tokenizer_token_bytes,
)
from gptrain.model.gpt import GPT, ModelConfig
from gptrain.tokenizer import TokenizerConfig, build_tokenizer
from gptrain.tokenizer.bpe import BPETokenizer
from gptrain.tokenizer.gpt2 import GPT2Tokenizer, gpt2_encoding

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak. Caf\u00e9 \u2014 na\u00efve \u00e6on.\n"


def make_checkpoint(tmp_path, tokenizer, *, bias: bool = True, name: str = "ckpt"):
    cfg = ModelConfig(n_embd=32, n_layer=2, n_head=2, block_size=16, vocab_size=tokenizer.vocab_size, bias=bias,
                      vocab_multiple=64)  # padded rows, which llm.c's export replaces with its own
    model = GPT(cfg)
    with torch.no_grad():  # biases and layernorms away from their init, so a swapped tensor would show
        for p_name, p in model.named_parameters():
            if not p_name.endswith(".weight") or ".ln_" in p_name or "ln_f" in p_name:
                p.add_(torch.randn_like(p) * 0.1)
    weights = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    return write_model_folder(tmp_path / name, cfg, weights, tokenizer, {"test": True})


def char_tokenizer():
    return build_tokenizer(TokenizerConfig(kind="char"), [TEXT])


def logits_of(model, vocab_size: int) -> torch.Tensor:
    idx = torch.randint(0, vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.eval()(idx)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_round_trip_gives_the_same_tensors_and_logits(tmp_path, dtype):
    tok = char_tokenizer()
    src = Checkpoint.load(make_checkpoint(tmp_path, tok), device="cpu")
    model_file, tok_file = export_llmc(src.path, tmp_path / "llmc", dtype=dtype)
    assert model_file.name == {"fp32": "gpt2_124M.bin", "bf16": "gpt2_124M_bf16.bin"}[dtype]
    assert tok_file.name == "gpt2_tokenizer.bin"
    back = Checkpoint.load(import_llmc(model_file, tmp_path / "back", tok_file), device="cpu")

    V = tok.vocab_size
    assert back.tokenizer.to_json() == tok.to_json()
    reference = GPT(src.model.config)  # the source model, with llm.c's zero padding rows and bf16 rounding
    expected = {k: v.clone() for k, v in src.model.state_dict().items() if k != "lm_head.weight"}  # tied
    expected["transformer.wte.weight"][V:] = 0
    if dtype == "bf16":
        expected = {k: v.to(torch.bfloat16).to(torch.float32) for k, v in expected.items()}
    reference.load_state_dict(expected, strict=False)
    got = back.model.state_dict()
    assert got.keys() - {"lm_head.weight"} == expected.keys()
    assert back.model.lm_head.weight is back.model.transformer.wte.weight
    for name, tensor in expected.items():
        if name == "transformer.wte.weight":  # the import pads to its own rows (auto: here none): the real ones
            assert got[name].shape[0] == back.model.config.padded_vocab_size and not got[name][V:].any()
            got[name], tensor = got[name][:V], tensor[:V]
        assert torch.equal(got[name], tensor), name
    if dtype == "fp32":
        assert not torch.equal(got["transformer.h.0.ln_1.bias"], torch.zeros(32))
    assert torch.equal(logits_of(back.model, V), logits_of(reference, V))
    if dtype == "fp32":
        assert torch.equal(logits_of(back.model, V), logits_of(src.model, V))

    sidecar = json.loads(model_file.with_suffix(".gptrain.json").read_text())
    assert sidecar["dtype"] == dtype and sidecar["step"] == 0 and sidecar["tokenizer"] == tok.name
    assert any("train_gpt2.c's fixed T" in note for note in sidecar["notes"])  # context 16 < 64
    state = json.loads((back.path / "state.json").read_text())
    assert state["imported_from"]["format"] == "llm.c" and state["imported_from"]["dtype"] == dtype


def test_header_fields(tmp_path):
    tok = char_tokenizer()
    model_file, _ = export_llmc(make_checkpoint(tmp_path, tok), tmp_path / "llmc")
    words = np.fromfile(model_file, dtype="<i4", count=256)
    assert list(words[:8]) == [20240326, 3, 16, tok.vocab_size, 2, 2, 32, 128]
    assert not words[8:].any()
    h = read_header(model_file)
    assert (h.max_seq_len, h.vocab_size, h.padded_vocab_size, h.dtype) == (16, tok.vocab_size, 128, "fp32")


def test_a_model_without_biases_is_written_with_zero_biases(tmp_path):
    tok = char_tokenizer()
    src = Checkpoint.load(make_checkpoint(tmp_path, tok, bias=False), device="cpu")
    model_file, tok_file = export_llmc(src, tmp_path / "llmc")
    back = Checkpoint.load(import_llmc(model_file, tmp_path / "back", tok_file), device="cpu")
    assert back.model.config.bias and not back.model.state_dict()["transformer.h.1.mlp.c_fc.bias"].any()
    diff = (logits_of(back.model, tok.vocab_size) - logits_of(src.model, tok.vocab_size)).abs().max().item()
    assert diff < 1e-5


def test_gpt2_and_bpe_tokenizers_keep_their_bytes(tmp_path):
    enc = gpt2_encoding()
    gpt2_bytes = tokenizer_token_bytes(GPT2Tokenizer())
    assert gpt2_bytes == [enc.decode_bytes([i]) for i in range(50257)]  # write_tokenizer's own call
    bpe = BPETokenizer.train([TEXT * 20], vocab_size=300)
    bpe_bytes = tokenizer_token_bytes(bpe)
    assert len(bpe_bytes) == bpe.vocab_size and bpe_bytes[bpe.eot_id] == b"<|endoftext|>"
    for text in (TEXT, " hear me, caf\u00e9"):
        assert b"".join(bpe_bytes[i] for i in bpe.encode(text)) == text.encode("utf-8")


def test_gpt2_export_and_import_keep_the_gpt2_tokenizer(tmp_path):
    model_file, tok_file = export_llmc(make_checkpoint(tmp_path, GPT2Tokenizer()), tmp_path / "llmc")
    assert tokenizer_from_llmc(tok_file).name == "gpt2"
    back = Checkpoint.load(import_llmc(model_file, tmp_path / "back"), device="cpu")  # V = 50257: GPT-2
    assert back.tokenizer.name == "gpt2"


def test_a_bpe_tokenizer_file_is_refused_without_its_tokenizer_json(tmp_path):
    bpe = BPETokenizer.train([TEXT * 20], vocab_size=300)
    model_file, tok_file = export_llmc(make_checkpoint(tmp_path, bpe), tmp_path / "llmc")
    with pytest.raises(UserError, match="--tokenizer"):
        import_llmc(model_file, tmp_path / "back", tok_file)
    with pytest.raises(UserError, match="--tokenizer"):
        import_llmc(model_file, tmp_path / "back")
    (tmp_path / "tok.json").write_text(bpe.to_json())
    back = Checkpoint.load(import_llmc(model_file, tmp_path / "back", tmp_path / "tok.json"), device="cpu")
    assert back.tokenizer.encode(TEXT) == bpe.encode(TEXT)


def test_a_token_longer_than_255_bytes_is_refused(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    bpe = BPETokenizer.train([TEXT * 20], vocab_size=300)
    hf = HFTokenizer.from_str(bpe.to_json())
    hf.add_special_tokens(["<|" + "x" * 300 + "|>"])
    with pytest.raises(UserError, match="255"):
        tokenizer_token_bytes(BPETokenizer(hf))


# train_gpt2.py's writers, rewritten from llm.c (f1e2ace): write_tensors' order, pad_vocab, the headers.
LLMC_ORDER = ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
              "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
              "mlp.c_proj.weight", "mlp.c_proj.bias"]


def write_model_like_llmc(params, n_layer, n_head, block_size, filename, dtype):
    header = torch.zeros(256, dtype=torch.int32)
    header[0], header[1] = 20240326, {"float32": 3, "bfloat16": 5}[dtype]
    V, C = params["transformer.wte.weight"].shape
    header[2], header[3], header[4], header[5], header[6] = block_size, V, n_layer, n_head, C
    wte = F.pad(params["transformer.wte.weight"], (0, 0, 0, (V + 127) // 128 * 128 - V), value=0)
    header[7] = wte.size(0)

    def write_fun(t, file):
        t = t.detach().cpu()
        if dtype == "float32":
            file.write(t.to(torch.float32).numpy().tobytes())
        else:
            file.write(t.to(torch.bfloat16).view(torch.int16).numpy().tobytes())

    with open(filename, "wb") as file:
        file.write(header.numpy().tobytes())
        write_fun(wte, file)
        write_fun(params["transformer.wpe.weight"], file)
        for suffix in LLMC_ORDER:
            for i in range(n_layer):
                write_fun(params[f"transformer.h.{i}.{suffix}"], file)
        write_fun(params["transformer.ln_f.weight"], file)
        write_fun(params["transformer.ln_f.bias"], file)


def write_tokenizer_like_llmc(enc, filename):
    n = enc.max_token_value + 1
    header = torch.zeros(256, dtype=torch.int32)
    header[0], header[1], header[2], header[3] = 20240328, 2, n, enc.eot_token
    with open(filename, "wb") as file:
        file.write(header.numpy().tobytes())
        for i in range(n):
            b = enc.decode_bytes([i])
            file.write(struct.pack("<B", len(b)))
            file.write(b)


def nanogpt_style_params(V=50257, C=16, L=2, T=8):
    """A state dict named like nanoGPT's / HF's GPT-2 (nn.Linear out x in), every tensor distinct."""
    g = torch.Generator().manual_seed(3)
    shapes = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (T, C),
              "transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,)}
    per_layer = {"ln_1.weight": (C,), "ln_1.bias": (C,), "attn.c_attn.weight": (3 * C, C), "attn.c_attn.bias": (3 * C,),
                 "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,), "ln_2.weight": (C,), "ln_2.bias": (C,),
                 "mlp.c_fc.weight": (4 * C, C), "mlp.c_fc.bias": (4 * C,), "mlp.c_proj.weight": (C, 4 * C),
                 "mlp.c_proj.bias": (C,)}
    shapes |= {f"transformer.h.{i}.{k}": s for i in range(L) for k, s in per_layer.items()}
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_reads_files_written_the_way_llmc_writes_them(tmp_path, dtype):
    params = nanogpt_style_params()
    write_model_like_llmc(params, 2, 2, 8, tmp_path / "model.bin", dtype)
    write_tokenizer_like_llmc(gpt2_encoding(), tmp_path / "tok.bin")
    tokens, eot = read_llmc_tokenizer(tmp_path / "tok.bin")
    assert (len(tokens), eot) == (50257, 50256)
    h = read_header(tmp_path / "model.bin")
    assert (h.max_seq_len, h.vocab_size, h.num_layers, h.num_heads, h.channels, h.padded_vocab_size) == \
        (8, 50257, 2, 2, 16, 50304)
    folder = import_llmc(tmp_path / "model.bin", tmp_path / "out", tmp_path / "tok.bin")
    stored = load_file(str(folder / "model.safetensors"))
    assert json.loads((folder / "tokenizer.json").read_text())["gptrain_tokenizer"] == "gpt2"
    assert stored.keys() == params.keys()
    for name, tensor in params.items():
        want = tensor if dtype == "float32" else tensor.to(torch.bfloat16).float()
        got = stored[name][:50257] if name == "transformer.wte.weight" else stored[name]
        assert torch.equal(got, want), name
    assert not stored["transformer.wte.weight"][50257:].any()


def test_truncated_and_foreign_files_are_refused(tmp_path):
    params = nanogpt_style_params(V=50257, C=8, L=1, T=4)
    write_model_like_llmc(params, 1, 2, 4, tmp_path / "model.bin", "float32")
    data = (tmp_path / "model.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[:-4])
    with pytest.raises(UserError, match="truncated"):
        import_llmc(tmp_path / "cut.bin", tmp_path / "out")
    (tmp_path / "long.bin").write_bytes(data + b"\0\0\0\0")
    with pytest.raises(UserError, match="4 bytes more"):
        import_llmc(tmp_path / "long.bin", tmp_path / "out")
    (tmp_path / "magic.bin").write_bytes(struct.pack("<i", 12345) + data[4:])
    with pytest.raises(UserError, match="magic 12345"):
        import_llmc(tmp_path / "magic.bin", tmp_path / "out")
    (tmp_path / "v4.bin").write_bytes(data[:4] + struct.pack("<i", 4) + data[8:])
    with pytest.raises(UserError, match="version 4"):
        import_llmc(tmp_path / "v4.bin", tmp_path / "out")
    (tmp_path / "short.bin").write_bytes(data[:100])
    with pytest.raises(UserError, match="too short"):
        import_llmc(tmp_path / "short.bin", tmp_path / "out")
    write_tokenizer_like_llmc(gpt2_encoding(), tmp_path / "tok.bin")
    with pytest.raises(UserError, match="tokenizer file"):
        import_llmc(tmp_path / "tok.bin", tmp_path / "out")
    (tmp_path / "tok_cut.bin").write_bytes((tmp_path / "tok.bin").read_bytes()[:-3])
    with pytest.raises(UserError, match="truncated or damaged"):
        read_llmc_tokenizer(tmp_path / "tok_cut.bin")
    assert not (tmp_path / "out").exists()
