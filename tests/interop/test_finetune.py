"""Fine-tuning from a Hugging Face model through --init-from (a local HF folder, imported once into the
cache): the first logged loss is the imported model's own loss on that batch, the loss falls; and the
export/import commands round-trip the result."""

import json

import torch
from test_hf_hub import hub_files

from gptrain import Checkpoint, resolve_config, train
from gptrain.cli import main
from gptrain.data.loader import ShardLoader


def test_fine_tuning_an_hf_model_starts_at_its_loss_and_the_loss_falls(tmp_path, corpus_dir, monkeypatch, capsys):
    files, model = hub_files(tmp_path, corpus_dir)  # a tiny GPT-2 in the Hub's original layout, BPE tokenizer
    monkeypatch.setenv("GPTRAIN_CACHE", str(tmp_path / "cache"))
    batches = []
    real_next = ShardLoader.next_batch

    def next_batch(self):
        batch = real_next(self)
        if self.shuffle and not batches:
            batches.append(batch)  # the first training batch
        return batch

    monkeypatch.setattr(ShardLoader, "next_batch", next_batch)
    values = {"data.source": str(corpus_dir), "data.data_dir": str(tmp_path / "ds"), "batch-size": 8, "steps": 30,
              "lr": 3e-3, "eval.every_steps": 0, "samples.every_steps": 0, "log.live": "off", "log.is_quiet": True,
              "run_dir": str(tmp_path / "tuned")}
    train(resolve_config(None, values, environ={}), init_from=tmp_path / "repo", log=lambda *_: None)
    imported = next((tmp_path / "cache" / "imported").iterdir())
    start = Checkpoint.load(imported, device="cpu")
    with torch.no_grad():
        direct = start.model(*batches[0]).item()  # with targets: the mean cross-entropy
    rows = [json.loads(line) for line in (tmp_path / "tuned" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert abs(losses[0] - direct) < 1e-5, (losses[0], direct)  # it started from the imported weights
    assert sum(losses[-5:]) / 5 < 0.9 * losses[0]  # 5.8 -> 4.7 here
    tuned = Checkpoint.load(tmp_path / "tuned")
    assert tuned.tokenizer.to_json() == start.tokenizer.to_json()  # the HF model's own tokenizer, kept

    # The commands: export to HF and llm.c, and import both back, each giving the same weights.
    assert main(["export", "--checkpoint", str(tmp_path / "tuned"), "--format", "hf", "--out",
                 str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "README.md").is_file()
    assert main(["import", "--format", "hf", "--from", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    assert main(["export", "--checkpoint", str(tmp_path / "tuned"), "--format", "llmc", "--out",
                 str(tmp_path / "llmc")]) == 0
    assert main(["import", "--format", "llmc", "--from", str(tmp_path / "llmc" / "gpt2_124M.bin"), "--tokenizer",
                 str(tmp_path / "tuned" / "tokenizer.json"), "--out", str(tmp_path / "back_llmc")]) == 0
    ids = torch.randint(0, tuned.tokenizer.vocab_size, (1, 16))
    with torch.no_grad():
        want = tuned.model(ids)
        for folder in ("back", "back_llmc"):
            assert (Checkpoint.load(tmp_path / folder).model(ids) - want).abs().max().item() < 1e-5, folder
    capsys.readouterr()
    hf_again = ["export", "--checkpoint", str(tmp_path / "tuned"), "--format", "hf", "--out", str(tmp_path / "hf")]
    assert main(hf_again) == 2 and capsys.readouterr().err.count("\n") == 1  # never over an existing export
