"""Hugging Face GPT-2 folders in and out: the same logits (fp32, max abs diff < 1e-4), greedy text and token ids
on both sides; both key layouts; refusals. transformers is a test (and `hf` extra) dependency only."""

import json

import pytest
import torch
from conftest import make_corpus_text  # tests/ is on sys.path: conftest.py lives there
from safetensors.torch import load_file, save_file

from gptrain import Checkpoint, resolve_config, train
from gptrain.errors import UserError
from gptrain.interop import write_model_folder
from gptrain.interop.hf import export_hf, import_hf, resolve_hf
from gptrain.interop.hf_tokenizer import write_hf_tokenizer
from gptrain.model.gpt import GPT, ModelConfig
from gptrain.tokenizer import TokenizerConfig, build_tokenizer
from gptrain.tokenizer.base import save_tokenizer

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4
PROBE = "KING.\nthou art the king, my lord; what news from rome?\n\n  naïve café 日本 'll 've\t!"


def randomize(model: torch.nn.Module, std: float = 0.3) -> None:
    """Weights far from their init, so every layer (and every transpose) shows in the logits."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    assert a.std() > 0.3  # logits of a real spread, not all near zero (a wrong mapping would show)
    return (a - b).abs().max().item()


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def gptrain_logits(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def tiny_hf_model(vocab_size: int, eot_id: int = 0):
    cfg = transformers.GPT2Config(vocab_size=vocab_size, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                  bos_token_id=eot_id, eos_token_id=eot_id)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    randomize(model)
    return model


def save_hub_original_layout(model, folder) -> None:
    """The Hub's original GPT-2 files: bare keys (no `transformer.`), attn.bias/masked_bias buffers, no lm_head."""
    folder.mkdir()
    tensors = {k.removeprefix("transformer."): v.contiguous() for k, v in model.state_dict().items()
               if k != "lm_head.weight"}
    n = model.config.n_positions
    for i in range(model.config.n_layer):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model.config.to_json_file(str(folder / "config.json"))


@pytest.fixture
def bpe(corpus_dir):
    texts = [p.read_text() for p in sorted(corpus_dir.iterdir())]
    return build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=300), texts)


@pytest.mark.parametrize("layout", ["save_pretrained", "sharded", "hub_original"])
def test_imported_hf_model_gives_the_same_logits(tmp_path, bpe, layout):
    model = tiny_hf_model(bpe.vocab_size, bpe.eot_id)
    source = tmp_path / "hf"
    if layout == "save_pretrained":
        model.save_pretrained(source)
        assert all(k.startswith("transformer.") for k in load_file(str(source / "model.safetensors")))
    elif layout == "sharded":
        model.save_pretrained(source, max_shard_size="40KB")
        assert len(list(source.glob("model-*.safetensors"))) > 1 and (source / "model.safetensors.index.json").is_file()
    if layout != "hub_original":
        save_tokenizer(bpe, tmp_path / "tokenizer.json")
        folder = import_hf(source, tmp_path / "gptrain", tokenizer=str(tmp_path / "tokenizer.json"))
    else:
        save_hub_original_layout(model, source)
        write_hf_tokenizer(bpe, source, 32)  # the folder's own tokenizer files
        folder = import_hf(source, tmp_path / "gptrain")
    checkpoint = Checkpoint.load(folder, device="cpu")
    assert checkpoint.tokenizer.to_json() == bpe.to_json()
    state = json.loads((folder / "state.json").read_text())
    assert state["imported_from"]["format"] == "hf" and state["imported_from"]["source"] == str(source)
    ids = torch.randint(0, bpe.vocab_size, (2, 32))
    diff = max_diff(hf_logits(model, ids), gptrain_logits(checkpoint.model, ids))
    print(f"hf -> gptrain ({layout}): max abs logit diff {diff:.2e}")
    assert diff < TOLERANCE


def train_tiny(tmp_path, corpus_dir, kind: str):
    values = {"data.source": str(corpus_dir), "data.data_dir": str(tmp_path / "dataset"), "data.val_fraction": 0.2,
              "tokenizer.kind": kind, "tokenizer.vocab_size": 300, "model.vocab_multiple": 64,  # padding rows to cut
              "embd": 32, "layers": 2, "heads": 2, "context": 32, "batch-size": 8, "steps": 20, "lr": 1e-2, "eval.every_steps": 10,
              "eval.num_batches": 2, "samples.every_steps": 0, "checkpoint.every_steps": 0, "log.live": "off",
              "log.is_quiet": True, "run_dir": str(tmp_path / "run")}
    train(resolve_config(None, values, environ={}), log=lambda *_: None)
    return tmp_path / "run"


def check_export(checkpoint: Checkpoint, out, *, greedy_prompt: str) -> None:
    """transformers alone loads `out` and computes what gptrain computes: logits, greedy text, token ids."""
    model = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    tokenizer = checkpoint.tokenizer
    assert hf_tokenizer(PROBE)["input_ids"] == tokenizer.encode_lenient(PROBE)
    assert hf_tokenizer.eos_token_id == tokenizer.eot_id == model.config.eos_token_id
    ids = torch.tensor([tokenizer.encode_lenient(make_corpus_text(20))[:32]])
    diff = max_diff(hf_logits(model, ids), gptrain_logits(checkpoint.model, ids))
    print(f"gptrain ({tokenizer.name}) -> hf: max abs logit diff {diff:.2e}")
    assert diff < TOLERANCE
    prompt = torch.tensor([tokenizer.encode(greedy_prompt)])
    ours = checkpoint.model.generate(prompt, 20, is_greedy=True)
    theirs = model.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                            pad_token_id=tokenizer.eot_id)
    assert theirs.tolist() == ours.tolist() and ours.shape[1] == prompt.shape[1] + 20
    assert hf_tokenizer.decode(theirs[0]) == tokenizer.decode(ours[0].tolist())


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_exported_trained_model_loads_in_transformers_and_back(tmp_path, corpus_dir, kind):
    run = train_tiny(tmp_path, corpus_dir, kind)
    out = export_hf(run, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
        "tokenizer.json", "tokenizer_config.json"]
    assert not (tmp_path / "hf.tmp").exists()
    keys = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in keys and keys["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)
    checkpoint = Checkpoint.load(run, device="cpu")
    assert keys["transformer.wte.weight"].shape[0] == checkpoint.tokenizer.vocab_size  # padding rows cut
    card = (out / "README.md").read_text()
    assert f"| step | {checkpoint.step} |" in card and str(run.resolve()) in card and "val loss" in card
    check_export(checkpoint, out, greedy_prompt="KING.\n")
    back = Checkpoint.load(import_hf(out, tmp_path / "back"), device="cpu")
    assert back.tokenizer.to_json() == checkpoint.tokenizer.to_json()
    assert "vocab_multiple = 0" not in (back.path / "config.toml").read_text()  # stored resolved, as runs are
    ids = torch.tensor([checkpoint.tokenizer.encode("thou art the king")])
    assert max_diff(gptrain_logits(back.model, ids), gptrain_logits(checkpoint.model, ids)) < TOLERANCE


def test_gpt2_tokenizer_model_without_biases_or_tying_exports(tmp_path):
    gpt2 = build_tokenizer(TokenizerConfig(kind="gpt2"))
    cfg = ModelConfig(n_embd=32, n_layer=2, n_head=2, block_size=32, vocab_size=gpt2.vocab_size, bias=False,
                      tie_weights=False)
    model = GPT(cfg)
    randomize(model)
    folder = write_model_folder(tmp_path / "ckpt", cfg, model.state_dict(), gpt2, {"format": "test"})
    out = export_hf(folder, tmp_path / "hf")
    assert {"vocab.json", "merges.txt", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert len((out / "merges.txt").read_text().splitlines()) == 1 + 50_000
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["vocab_size"] == 50257
    checkpoint = Checkpoint.load(folder, device="cpu")
    check_export(checkpoint, out, greedy_prompt="Hello, my name is")
    # The comparison tells GELUs apart: transformers' exact (erf) GELU is not what gptrain computes.
    ids = torch.tensor([gpt2.encode(PROBE)[:32]])
    erf = transformers.GPT2LMHeadModel.from_pretrained(out, activation_function="gelu").eval()
    erf_diff = max_diff(hf_logits(erf, ids), gptrain_logits(checkpoint.model, ids))
    print(f"the same folder with activation_function='gelu' (erf): max abs logit diff {erf_diff:.2e}")
    assert erf_diff > TOLERANCE
    assert transformers.GPT2Tokenizer.from_pretrained(out)(PROBE)["input_ids"] == gpt2.encode(PROBE)
    back = Checkpoint.load(import_hf(out, tmp_path / "back"), device="cpu")
    assert back.tokenizer.name == "gpt2" and back.model.config.tie_weights is False
    assert max_diff(gptrain_logits(back.model, ids), gptrain_logits(checkpoint.model, ids)) < TOLERANCE


def test_export_refuses_a_non_empty_out(tmp_path, tiny_config):
    char = build_tokenizer(TokenizerConfig(kind="char"), ["abc"])
    folder = write_model_folder(tmp_path / "ckpt", tiny_config, GPT(tiny_config).state_dict(), char, {})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        export_hf(folder, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def write_config(folder, **overrides) -> None:
    folder.mkdir(exist_ok=True)
    config = {"model_type": "gpt2", "vocab_size": 300, "n_positions": 32, "n_embd": 32, "n_layer": 2, "n_head": 2,
              "n_inner": None, "activation_function": "gelu_new"} | overrides
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(("overrides", "message"), [
    ({"activation_function": "relu"}, "activation_function='relu'"),
    ({"n_inner": 96}, "n_inner=96"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"add_cross_attention": True}, "add_cross_attention"),
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon"),
    ({"model_type": "llama"}, "'llama' model"),
])
def test_configs_gptrain_cannot_compute_are_refused(tmp_path, overrides, message):
    write_config(tmp_path / "hf", **overrides)
    with pytest.raises(UserError, match=message) as refused:
        import_hf(tmp_path / "hf", tmp_path / "out")
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "out").exists()


def test_missing_weights_or_tokenizer_are_refused(tmp_path, bpe):
    write_config(tmp_path / "hf")
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(UserError, match="safetensors weights only, never pickle"):
        import_hf(tmp_path / "hf", tmp_path / "out")
    model = tiny_hf_model(300)
    model.save_pretrained(tmp_path / "hf2")
    with pytest.raises(UserError, match="no tokenizer files and 300 vocabulary rows.*--tokenizer"):
        import_hf(tmp_path / "hf2", tmp_path / "out")
    big = build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=400), [make_corpus_text(300)])
    save_tokenizer(big, tmp_path / "big.json")
    with pytest.raises(UserError, match="ids but the model in .* only 300 embedding rows"):
        import_hf(tmp_path / "hf2", tmp_path / "out", tokenizer=str(tmp_path / "big.json"))
    assert not (tmp_path / "out").exists()


def test_resolve_hf_finds_local_folders_only_when_they_are_hf(tmp_path, tiny_config):
    write_config(tmp_path / "hf")
    assert resolve_hf(tmp_path / "hf") == tmp_path / "hf"
    char = build_tokenizer(TokenizerConfig(kind="char"), ["abc"])
    ckpt = write_model_folder(tmp_path / "ckpt", tiny_config, GPT(tiny_config).state_dict(), char, {})
    assert resolve_hf(ckpt) is None  # a gptrain checkpoint: the caller's first choice
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")
    assert resolve_hf(tmp_path / "other") is None
    assert resolve_hf(str(tmp_path / "missing" / "run")) is None  # an absolute path is never a Hub name
    assert resolve_hf("./runs/x") is None
