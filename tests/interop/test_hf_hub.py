"""Hub names without the internet: a fake Hub on 127.0.0.1 (HF_ENDPOINT) fills a private HF cache, which then
serves the same name with HF_HUB_OFFLINE=1 and the server gone. huggingface_hub reads those variables at import,
so each case runs in a fresh interpreter."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fake_hub import FakeHub  # tests/ is on sys.path: conftest.py lives there
from safetensors.torch import save_file

from gptrain import Checkpoint
from gptrain.interop.hf_tokenizer import write_hf_tokenizer
from gptrain.model.gpt import GPT, ModelConfig
from gptrain.tokenizer import TokenizerConfig, build_tokenizer

REPO = "org/gpt2-tiny-test"


def hub_files(tmp_path, corpus_dir) -> tuple[dict[str, bytes], torch.nn.Module]:
    """A tiny GPT-2 in the Hub's original layout (bare keys, attn.bias buffers) with a byte-level BPE tokenizer,
    plus files snapshot_download must not fetch (pickle weights, an onnx/ copy)."""
    tokenizer = build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=300),
                                [p.read_text() for p in sorted(corpus_dir.iterdir())])
    cfg = ModelConfig(n_embd=32, n_layer=2, n_head=2, block_size=32, vocab_size=tokenizer.vocab_size, vocab_multiple=1)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)  # far from the init: every layer shows in the logits
    folder = tmp_path / "repo"
    folder.mkdir()
    tensors = {}
    for name, t in model.state_dict().items():
        if name != "lm_head.weight":
            is_conv1d = name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))
            tensors[name.removeprefix("transformer.")] = (t.t() if is_conv1d else t).contiguous().clone()
    tensors |= {f"h.{i}.attn.bias": torch.tril(torch.ones(1, 1, 32, 32)) for i in range(2)}
    save_file(tensors, str(folder / "model.safetensors"))
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": tokenizer.vocab_size,
              "n_positions": 32, "n_embd": 32, "n_layer": 2, "n_head": 2, "activation_function": "gelu_new"}
    (folder / "config.json").write_text(json.dumps(config))
    write_hf_tokenizer(tokenizer, folder, 32)
    files = {f"{REPO}/{p.name}": p.read_bytes() for p in folder.iterdir()}
    files |= {f"{REPO}/pytorch_model.bin": b"never fetched", f"{REPO}/onnx/config.json": b"{}"}
    return files, model


def run_calls(env: dict[str, str], calls: list[list]) -> list[dict]:
    """[function, *args] calls of gptrain.interop.hf in one fresh interpreter: {"result"} or {"error"} each."""
    code = (
        "import json, sys\n"
        "from gptrain.errors import UserError\n"
        "from gptrain.interop import hf\n"
        "out = []\n"
        "for name, *args in json.loads(sys.argv[1]):\n"
        "    try:\n"
        "        result = getattr(hf, name)(*args)\n"
        "        out.append({'result': None if result is None else str(result)})\n"
        "    except UserError as e:\n"
        "        out.append({'error': str(e)})\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, json.dumps(calls)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def test_hub_name_downloads_then_imports_offline_from_the_cache(tmp_path, corpus_dir):
    files, model = hub_files(tmp_path, corpus_dir)
    hf_home, cache = tmp_path / "hf_home", tmp_path / "hub_cache"  # HF_HUB_CACHE wins over HF_HOME/hub
    # No GPT-2 ranks file, and nowhere to fetch one: a BPE model's import must not need it.
    extra = {"HF_HUB_CACHE": str(cache), "GPTRAIN_CACHE": str(tmp_path / "empty"),
             "GPTRAIN_GPT2_URL": "http://127.0.0.1:9/r50k_base.tiktoken"}
    with FakeHub(files) as hub:
        online = run_calls(hub.env(hf_home) | extra, [
            ["import_hf", REPO, str(tmp_path / "online")],
            ["resolve_hf", "org/no-such-model"],
            ["import_hf", f"{REPO}@no-such-branch", str(tmp_path / "x")],
        ])
        fetched = {path.split("?")[0] for method, path, _ in hub.requests if "/resolve/" in path}
        offline_env = hub.env(hf_home, is_offline=True) | extra
    assert online[0] == {"result": str(tmp_path / "online")}
    assert online[1] == {"result": None}  # the Hub has no such repository: the caller tries other kinds
    assert "no revision 'no-such-branch'" in online[2]["error"]
    assert {Path(p).name for p in fetched} == {"config.json", "model.safetensors", "tokenizer.json",
                                               "tokenizer_config.json", "special_tokens_map.json"}
    # The server is gone: only the cache answers now.
    offline = run_calls(offline_env, [
        ["import_hf", REPO, str(tmp_path / "offline")],
        ["import_hf", "org/never-downloaded", str(tmp_path / "y")],
    ])
    assert offline[0] == {"result": str(tmp_path / "offline")}
    assert "org/never-downloaded" in offline[1]["error"] and "HF_HUB_OFFLINE=1" in offline[1]["error"]
    ids = torch.randint(0, model.config.vocab_size, (1, 32))
    for name in ("online", "offline"):
        checkpoint = Checkpoint.load(tmp_path / name, device="cpu")
        origin = checkpoint.state["imported_from"]
        assert origin["repo_id"] == REPO and origin["revision"] == hub.commit and origin["source"] == REPO
        assert Path(origin["path"]).is_relative_to(cache) and not (hf_home / "hub").exists()
        assert checkpoint.tokenizer.name == "bpe300"
        with torch.no_grad():
            diff = (checkpoint.model(ids) - model(ids)).abs().max().item()
        print(f"hub ({name}) -> gptrain: max abs logit diff {diff:.2e}")
        assert diff < 1e-4


def test_a_hub_name_works_for_init_from_and_generate_offline(tmp_path, corpus_dir):
    """What a user types: `--init-from owner/name` and `generate --checkpoint owner/name`, from the HF cache
    with HF_HUB_OFFLINE=1 (filled first from the local Hub), imported once into $GPTRAIN_CACHE/imported/."""
    files, _ = hub_files(tmp_path, corpus_dir)
    hf_home, cache = tmp_path / "hf_home", tmp_path / "hub_cache"
    extra = {"HF_HUB_CACHE": str(cache), "GPTRAIN_CACHE": str(tmp_path / "gptrain_cache")}
    with FakeHub(files) as hub:
        assert run_calls(hub.env(hf_home) | extra, [["resolve_hf", REPO]])[0]["result"]  # fills the HF cache
        offline = hub.env(hf_home, is_offline=True) | extra
    gptrain = [sys.executable, "-m", "gptrain"]
    generated = subprocess.run([*gptrain, "generate", "--checkpoint", REPO, "--prompt", "KING", "--max-tokens", "8",
                                "--greedy"], env=offline, capture_output=True, text=True, timeout=120)
    assert generated.returncode == 0 and generated.stdout.startswith("KING"), generated.stderr
    tuned = subprocess.run([*gptrain, "train", "--init-from", REPO, "--data", str(corpus_dir), "--data.data_dir",
                            str(tmp_path / "ds"), "--steps", "3", "--batch-size", "4", "--eval.every_steps=0",
                            "--samples.every_steps=0", "--quiet", "--run-dir", str(tmp_path / "tuned")],
                           env=offline, capture_output=True, text=True, timeout=180)
    assert tuned.returncode == 0, tuned.stderr
    assert len(list((tmp_path / "gptrain_cache" / "imported").iterdir())) == 1  # imported once, reused
    assert Checkpoint.load(tmp_path / "tuned").tokenizer.name == "bpe300"
