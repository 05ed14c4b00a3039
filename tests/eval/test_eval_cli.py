"""`gptrain eval`, `report` and `compare` on real tiny runs, and HellaSwag during training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gptrain.cli import main
from gptrain.config import resolve_config
from gptrain.train.loop import train

FIXTURE = Path(__file__).parent.parent / "fixtures" / "hellaswag_fixture.jsonl"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _train(tmp_path: Path, corpus: Path, name: str, **extra) -> Path:
    values = {
        "data.source": str(corpus), "data.data_dir": str(tmp_path / "dataset"), "data.val_fraction": 0.2,
        "tokenizer.kind": "char", "embd": 32, "layers": 2, "heads": 2, "context": 32, "batch-size": 8,
        "steps": 40, "lr": 1e-2, "schedule.num_warmup_steps": 5, "eval.every_steps": 20, "eval.num_batches": 2,
        "samples.every_steps": 0, "samples.num_tokens": 10, "checkpoint.every_steps": 0, "log.live": "off",
        "log.is_quiet": True, "run_dir": str(tmp_path / name),
    }
    train(resolve_config(None, values | extra, environ={}), log=lambda *_: None)
    return tmp_path / name


@pytest.fixture(scope="module")
def trained(tmp_path_factory, request):
    """One run that scored HellaSwag (the fixture) at every validation."""
    from conftest import make_corpus_text

    tmp_path = tmp_path_factory.mktemp("evalrun")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(5):
        (corpus / f"play_{i}.txt").write_text(make_corpus_text(120, seed=i))
    run = _train(tmp_path, corpus, "run", **{"eval.hellaswag_every_steps": 20, "eval.hellaswag_file": str(FIXTURE),
                                             "eval.hellaswag_limit": 12})
    return tmp_path, corpus, run


def test_hellaswag_runs_with_validation_during_training(trained):
    _, _, run = trained
    val = [r for r in _rows(run / "metrics.jsonl") if r["kind"] == "val"]
    assert [r["step"] for r in val] == [20, 40]
    for row in val:
        assert row["hellaswag_num_items"] == 12 and 0 <= row["hellaswag_acc_norm"] <= 1
        # The corpus's alphabet lacks letters the items use: they are scored as unknown symbols, not lost.
        assert row["hellaswag_num_unencodable"] == 0
        assert row["val_num_tokens"] == 2 * 8 * 32 and row["val_bpb"] > 0


def test_eval_scores_the_whole_val_split_from_any_folder_and_the_report_agrees(trained, tmp_path, monkeypatch,
                                                                                 capsys):
    _, _, run = trained
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(run), "--json", str(out), "--batch-size", "3"]) == 0
    assert main(["eval", "--checkpoint", str(run), "--hellaswag", str(FIXTURE), "--limit", "5"]) == 0
    assert "scope: full" in capsys.readouterr().out
    result = json.loads(out.read_text())["eval"]
    recorded = _rows(run / "eval.jsonl")
    assert recorded[0] == result and result["scope"] == "full" and result["split"] == "val"
    meta = json.loads((Path(result["data"]) / "meta.json").read_text())
    num_shards = len(list(Path(result["data"]).glob("*_val_*.bin")))
    assert result["num_tokens"] == meta["num_val_tokens"] - num_shards  # every token but each shard's first
    assert recorded[1]["kind"] == "hellaswag" and recorded[1]["num_items"] == 5
    assert main(["report", str(run)]) == 0
    report = (run / "report.md").read_text()
    val = [r for r in _rows(run / "metrics.jsonl") if r["kind"] == "val"]
    best = min(r["val_loss"] for r in val)
    assert f"| {best:.4f} |" in report and f"{val[-1]['val_bpb']:.4f}" in report
    assert f"| {result['loss']:.4f} | {result['perplexity']:,.2f} | {result['bpb']:.4f} |" in report
    assert f"{100 * recorded[1]['acc_norm']:.2f}%" in report and (run / "loss.png").stat().st_size > 1000


def test_eval_re_prepares_a_moved_dataset_and_says_when_it_cannot(trained, tmp_path, capsys):
    root, corpus, _ = trained
    copy_root = tmp_path / "copy"
    shutil.copytree(root, copy_root)
    run = copy_root / "run"
    first = main(["eval", "--checkpoint", str(run)])
    shutil.rmtree(root / "dataset.moved", ignore_errors=True)
    (root / "dataset").rename(root / "dataset.moved")  # the folder state.json names is gone
    try:
        assert first == 0 and main(["eval", "--checkpoint", str(run)]) == 0  # rebuilt from the corpus
        losses = [r["loss"] for r in _rows(run / "eval.jsonl") if r["kind"] == "eval"]
        assert losses[-1] == losses[-2]  # the same figures from the rebuilt dataset
        shutil.rmtree(root / "dataset")
        corpus.rename(corpus.with_name("corpus.moved"))
        capsys.readouterr()
        assert main(["eval", "--checkpoint", str(run)]) == 2
        assert "pass --data NAME|PATH" in capsys.readouterr().err
    finally:
        if corpus.with_name("corpus.moved").exists():
            corpus.with_name("corpus.moved").rename(corpus)
        shutil.rmtree(root / "dataset", ignore_errors=True)
        (root / "dataset.moved").rename(root / "dataset")


def test_compare_tables_runs_and_warns_when_val_sets_differ(trained, tmp_path, capsys):
    root, corpus, run = trained
    same = _train(root, corpus, "same", **{"lr": 3e-3})
    other = _train(root, corpus, "other", **{"eval.num_batches": 3})  # another val sample
    png = tmp_path / "curves.png"
    assert main(["compare", str(run), str(same), "--out", str(png)]) == 0
    text = capsys.readouterr().out
    assert "run" in text and "same" in text and "warning" not in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["compare", str(run), str(other)]) == 0
    assert "val sets differ" in capsys.readouterr().out
    (same / "loss.png").unlink()
    assert main(["plot", str(same)]) == 0 and (same / "loss.png").read_bytes()[:4] == b"\x89PNG"
