import gzip
import json

import numpy as np
import pytest
from conftest import make_corpus_text

from gptrain.data import encode, split
from gptrain.data.dataset import shard_paths
from gptrain.data.prepare import DataConfig, prepare_dataset
from gptrain.data.shards import open_shard
from gptrain.data.sources import load_documents, local_source, shakespeare_source
from gptrain.data.split import SplitRule, labelled_documents
from gptrain.errors import UserError
from gptrain.tokenizer import TokenizerConfig, load_tokenizer

QUIET = dict(log=lambda *_: None)


def _tokens(folder, split_name):
    return np.concatenate([np.asarray(open_shard(p)) for p in shard_paths(folder, split_name)])


def _documents_of(folder, split_name):
    """The texts of a split, cut at the separators."""
    tok = load_tokenizer(folder / "tokenizer.json")
    tokens = _tokens(folder, split_name)
    starts = list(np.flatnonzero(tokens == tok.eot_id)) + [len(tokens)]
    return [tok.decode(list(tokens[a + 1 : b])) for a, b in zip(starts, starts[1:], strict=False)]


def _folder_corpus(tmp_path, count=10):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(count):
        (folder / f"doc{i:02d}.txt").write_text(f"text of play {i}\n" * (10 + i))
    return folder


def _split(source, rule=None):
    pairs = list(labelled_documents(source, rule or SplitRule()))
    return [d.text for label, d in pairs if label == "train"], [d.text for label, d in pairs if label == "val"]


def test_split_is_by_whole_document_and_deterministic(tmp_path):
    source = local_source(str(_folder_corpus(tmp_path)))
    train, val = _split(source, SplitRule(val_fraction=0.2, seed=7))
    texts = [d.text for d in load_documents(source)]
    assert set(train).isdisjoint(val) and sorted(train + val) == sorted(texts)
    assert sum(map(len, val)) >= 0.2 * sum(map(len, texts))
    assert _split(source, SplitRule(val_fraction=0.2, seed=7)) == (train, val)
    assert _split(source, SplitRule(val_fraction=0.2, seed=8)) != (train, val)


def test_a_big_corpus_is_split_by_a_seeded_hash_in_one_pass(tmp_path, monkeypatch):
    folder = tmp_path / "big"
    folder.mkdir()
    for i in range(400):
        (folder / f"d{i:03d}.txt").write_text(f"document {i}\n")
    monkeypatch.setattr(split, "SMALL_CORPUS_BYTES", 0)
    monkeypatch.setattr(split, "document_lengths", lambda source: pytest.fail("a second pass over a big corpus"))
    train, val = _split(local_source(str(folder)), SplitRule(val_fraction=0.25, seed=1))
    assert 60 <= len(val) <= 140 and len(train) + len(val) == 400
    assert _split(local_source(str(folder)), SplitRule(val_fraction=0.25, seed=1))[1] == val


def test_single_document_split_at_line_break(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("line\n" * 100)
    train, val = _split(local_source(str(path)), SplitRule(val_fraction=0.1))
    assert train[0].endswith("line") and val[0].startswith("\n") and train[0] + val[0] == "line\n" * 100


def test_a_text_file_read_in_pieces_encodes_as_the_whole(tmp_path, monkeypatch):
    """Pieces are cut where GPT-2's pre-tokenizer cuts anyway, so the tokens do not change."""
    from gptrain.data import sources
    from gptrain.tokenizer.gpt2 import GPT2Tokenizer

    text = make_corpus_text(300) + "\n\n  indented   line\n\n\nlast"
    path = tmp_path / "big.txt"
    path.write_text(text)
    monkeypatch.setattr(sources, "PIECE_BYTES", 500)
    pieces = list(sources.read_text_file(path))
    assert len(pieces) > 10 and "".join(p.text for p in pieces) == text
    assert not pieces[0].is_continuation and all(p.is_continuation for p in pieces[1:])
    tok = GPT2Tokenizer()
    assert sum((tok.encode(p.text) for p in pieces), []) == tok.encode(text)


def test_prepare_writes_shards_tokenizer_and_meta(corpus_dir, tmp_path):
    data = DataConfig(source=str(corpus_dir), data_dir=str(tmp_path / "ds"), val_fraction=0.2)
    folder = prepare_dataset(data, TokenizerConfig(kind="char"), **QUIET)
    meta = json.loads((folder / "meta.json").read_text())
    tok = load_tokenizer(folder / "tokenizer.json")
    train = open_shard(shard_paths(folder, "train")[0])
    assert meta["num_train_tokens"] == len(train) and meta["num_documents"] == 5
    assert meta["vocab_size"] == tok.vocab_size and len(meta["tokenizer_sha256"]) == 64
    assert train[0] == tok.eot_id  # every document starts with the separator, as in llm.c
    assert (train == tok.eot_id).sum() == 4  # four plays train, one play val
    plays = {(corpus_dir / f"play_{i}.txt").read_text() for i in range(5)}
    assert set(_documents_of(folder, "train")) | set(_documents_of(folder, "val")) == plays  # whole plays, exactly
    # Same source and tokenizer: reused, not rebuilt.
    assert prepare_dataset(data, TokenizerConfig(kind="char"), **QUIET) == folder
    with pytest.raises(UserError, match="holds a dataset"):
        prepare_dataset(data, TokenizerConfig(kind="bpe", vocab_size=300), **QUIET)


@pytest.mark.parametrize("kind", ["gpt2", "bpe"])
def test_round_trip_text_to_shards_to_text(corpus_dir, tmp_path, kind):
    data = DataConfig(source=str(corpus_dir), data_dir=str(tmp_path / kind), val_fraction=0.2)
    folder = prepare_dataset(data, TokenizerConfig(kind=kind, vocab_size=300), **QUIET)
    plays = sorted((corpus_dir / f"play_{i}.txt").read_text() for i in range(5))
    assert sorted(_documents_of(folder, "train") + _documents_of(folder, "val")) == plays


def test_one_worker_and_two_write_identical_shards(corpus_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(encode, "TASK_CHARS", 2000)  # many tasks in flight at once
    folders = []
    for workers in (1, 2):
        data = DataConfig(source=str(corpus_dir), data_dir=str(tmp_path / f"w{workers}" / "ds"), shard_tokens=1500,
                          num_workers=workers)
        folders.append(prepare_dataset(data, TokenizerConfig(kind="gpt2"), **QUIET))
    names = sorted(p.name for p in folders[0].glob("*.bin"))
    assert len(names) > 4 and names == sorted(p.name for p in folders[1].glob("*.bin"))
    for name in names:
        assert (folders[0] / name).read_bytes() == (folders[1] / name).read_bytes()


def test_an_interrupted_preparation_resumes_and_matches_an_uninterrupted_one(corpus_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(encode, "TASK_CHARS", 1000)
    tok = TokenizerConfig(kind="gpt2")
    whole = prepare_dataset(DataConfig(source=str(corpus_dir), data_dir=str(tmp_path / "whole"), shard_tokens=2000,
                                       num_workers=1), tok, **QUIET)
    data = DataConfig(source=str(corpus_dir), data_dir=str(tmp_path / "cut"), shard_tokens=2000, num_workers=1)
    real_write, calls = encode.write_manifest, []

    def write_then_die(folder, manifest):
        real_write(folder, manifest)
        calls.append(manifest["position"])
        if len(calls) == 3:  # the fresh manifest, then two finished shards
            raise KeyboardInterrupt

    monkeypatch.setattr(encode, "write_manifest", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(data, tok, **QUIET)
    assert not (tmp_path / "cut").exists()  # nothing a run would read
    (next(tmp_path.glob("cut.partial*")) / ".manifest.json.99999.tmp").write_text("{")  # a write killed midway
    monkeypatch.setattr(encode, "write_manifest", real_write)
    logs = []
    folder = prepare_dataset(data, tok, log=logs.append)
    assert any("resuming" in line for line in logs) and calls[-1] > 0
    names = sorted(p.name.replace("cut", "whole") for p in folder.glob("*.bin"))
    assert names == sorted(p.name for p in whole.glob("*.bin"))
    for path in folder.glob("*.bin"):
        assert path.read_bytes() == (whole / path.name.replace("cut", "whole")).read_bytes()
    assert not list(tmp_path.glob("cut.partial*"))
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_first_tokens_rule_and_an_explicit_val_source(corpus_dir, tmp_path):
    tok = TokenizerConfig(kind="gpt2")
    everything = prepare_dataset(DataConfig(source=str(corpus_dir), data_dir=str(tmp_path / "all"),
                                            val_tokens=1), tok, **QUIET)
    stream = np.concatenate([_tokens(everything, "val"), _tokens(everything, "train")])
    folder = prepare_dataset(DataConfig(source=str(corpus_dir), data_dir=str(tmp_path / "first"), val_tokens=777),
                             tok, **QUIET)
    assert np.array_equal(_tokens(folder, "val"), stream[:777])
    assert np.array_equal(_tokens(folder, "train"), stream[777:])
    val_file = tmp_path / "val.txt"
    val_file.write_text("A separate validation text.\n")
    folder = prepare_dataset(DataConfig(source=str(corpus_dir), val_source=str(val_file),
                                        data_dir=str(tmp_path / "explicit")), tok, **QUIET)
    assert _documents_of(folder, "val") == ["A separate validation text.\n"]
    assert len(_documents_of(folder, "train")) == 5


def test_jsonl_jsonl_gz_and_parquet_sources(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert [d.text for d in load_documents(local_source(str(path)))] == ["one", "two"]
    path.write_text('{"txt": "one"}\n')
    with pytest.raises(UserError, match=r'c.jsonl:1 is not a JSON object with a "text" field \(set --text-field'):
        load_documents(local_source(str(path)))
    assert [d.text for d in load_documents(local_source(str(path), text_field="txt"))] == ["one"]
    gz = tmp_path / "c.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"body": "a"}\n{"body": "b"}\n'))
    assert [d.text for d in load_documents(local_source(str(gz), "body"))] == ["a", "b"]
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    table = pa.table({"id": [1, 2, 3], "content": ["alpha", None, "gamma"]})
    pq.write_table(table, tmp_path / "c.parquet", row_group_size=2)
    assert [d.text for d in load_documents(local_source(str(tmp_path / "c.parquet"), "content"))] == ["alpha", "gamma"]
    with pytest.raises(UserError, match="has no column 'text' .*id, content.*--text-field"):
        load_documents(local_source(str(tmp_path / "c.parquet")))


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
        prepare_dataset(DataConfig(source=str(path), data_dir=str(tmp_path / "ds")), TokenizerConfig(kind="char"),
                        **QUIET)
    assert not (tmp_path / "ds").exists()


def test_missing_corpus_and_unknown_name():
    with pytest.raises(UserError, match="does not exist"):
        local_source("/nonexistent/corpus.txt")
    with pytest.raises(UserError, match="neither a corpus in the catalogue .* nor a path"):
        prepare_dataset(DataConfig(source="tinystoriez"), TokenizerConfig(kind="char"), **QUIET)


def test_shakespeare_is_installed_and_split_by_play():
    docs = load_documents(shakespeare_source())
    assert len(docs) == 42 and sum(len(d.text) for d in docs) > 4_000_000
    assert any(d.name == "hamlet" for d in docs) and not any("_gut_f" in d.name for d in docs)


def test_folder_skips_hidden_files_and_rebuilds_when_the_corpus_changes(corpus_dir, tmp_path):
    (corpus_dir / ".git").mkdir()
    (corpus_dir / ".git" / "index").write_bytes(b"\x00binary")
    (corpus_dir / ".DS_Store").write_bytes(b"\x00\x01")
    assert len(load_documents(local_source(str(corpus_dir)))) == 5
    data = DataConfig(source=str(corpus_dir), data_dir=str(tmp_path / "ds"), val_fraction=0.2)
    logs = []
    prepare_dataset(data, TokenizerConfig(kind="char"), log=logs.append)
    first = json.loads((tmp_path / "ds" / "meta.json").read_text())["num_train_tokens"]
    (corpus_dir / "play_5.txt").write_text("KING.\nA new play.\n" * 50)
    prepare_dataset(data, TokenizerConfig(kind="char"), log=logs.append)
    assert any("rebuilding" in line for line in logs)
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert meta["num_documents"] == 6 and meta["num_train_tokens"] != first
    assert not list(tmp_path.glob("ds.*"))  # no .partial or .old left


def test_fingerprint_does_not_depend_on_how_the_path_is_spelled(corpus_dir, monkeypatch):
    from gptrain.data.prepare import fingerprint

    absolute = fingerprint(DataConfig(source=str(corpus_dir)))
    monkeypatch.chdir(corpus_dir.parent)
    assert fingerprint(DataConfig(source=corpus_dir.name)) == absolute


def test_a_folder_of_llmc_shards_is_used_as_is(tmp_path):
    from gptrain.data.dataset import load_dataset_tokenizer
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
    from gptrain.data.ranks import failure_marker, wait_for_dataset, write_failure_marker

    data = DataConfig(source=str(corpus_dir), data_dir=str(tmp_path / "ds"), prepare_timeout_seconds=1)
    tok = TokenizerConfig(kind="char")
    with pytest.raises(UserError, match="waited 1s .* data.prepare_per_node"):
        wait_for_dataset(data, tok, None, poll_seconds=0.05)
    write_failure_marker(data, tok, None, "the corpus is empty")
    with pytest.raises(UserError, match="failed on the preparing rank: the corpus is empty"):
        wait_for_dataset(data, tok, None, poll_seconds=0.05)
    failure_marker(data, tok, None).unlink()
    folder = prepare_dataset(data, tok, **QUIET)
    assert wait_for_dataset(data, tok, None, poll_seconds=0.05) == folder


def test_bpe_is_fitted_on_at_most_max_train_chars(corpus_dir, tmp_path):
    from gptrain.tokenizer import build_tokenizer

    seen = []
    texts = (t for t in [make_corpus_text(50, seed=i) for i in range(5)] if not seen.append(t))
    small = build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=300, max_train_chars=1000), texts)
    assert len(seen) == 1 and small.vocab_size <= 300  # a stream, read only as far as the cap


def test_training_refuses_shards_of_another_tokenizer(corpus_dir, tmp_path):
    from gptrain.data.dataset import check_dataset_tokenizer
    from gptrain.data.shards import write_shard
    from gptrain.tokenizer.gpt2 import GPT2Tokenizer

    folder = prepare_dataset(DataConfig(source=str(corpus_dir), data_dir=str(tmp_path / "ds")),
                             TokenizerConfig(kind="char"), **QUIET)
    check_dataset_tokenizer(folder, load_tokenizer(folder / "tokenizer.json"))
    with pytest.raises(UserError, match="was made with tokenizer char.* but this run uses gpt2"):
        check_dataset_tokenizer(folder, GPT2Tokenizer())
    llmc = tmp_path / "llmc"
    llmc.mkdir()
    write_shard(llmc / "x_train_000000.bin", [1, 2, 50_000], 50257)
    write_shard(llmc / "x_val_000000.bin", [1, 2, 3], 50257)
    check_dataset_tokenizer(llmc, GPT2Tokenizer())
    with pytest.raises(UserError, match="holds token id 50000, beyond the vocabulary"):
        check_dataset_tokenizer(llmc, load_tokenizer(folder / "tokenizer.json"))


def test_out_never_replaces_what_is_not_a_dataset(corpus_dir, tmp_path):
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "precious.txt").write_text("keep me")
    (tmp_path / "afile").write_text("keep me too")
    for out in (precious, tmp_path / "afile", corpus_dir):
        with pytest.raises(UserError, match="is never overwritten"):
            prepare_dataset(DataConfig(source=str(corpus_dir), data_dir=str(out)), TokenizerConfig(kind="char"),
                            **QUIET)
    assert (precious / "precious.txt").read_text() == "keep me" and (tmp_path / "afile").read_text() == "keep me too"
    assert len(list(corpus_dir.glob("*.txt"))) == 5


def test_bad_input_leaves_no_partial_folder_lock_or_data_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text key"}\n')
    (tmp_path / "bad.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00 not really gzip")
    for name, message in [("bad.jsonl", 'bad.jsonl:2 is not a JSON object with a "text" field'),
                          ("bad.jsonl.gz", "is not a readable gzip file")]:
        with pytest.raises(UserError, match=message):
            prepare_dataset(DataConfig(source=name), TokenizerConfig(kind="gpt2"), **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "bad.jsonl.gz"]


def test_a_split_that_comes_out_empty_is_an_error(corpus_dir, tmp_path):
    with pytest.raises(UserError, match="train split .* came out empty"):
        prepare_dataset(DataConfig(source=str(corpus_dir), data_dir=str(tmp_path / "ds"), val_tokens=10**9),
                        TokenizerConfig(kind="gpt2"), **QUIET)
    assert not list(tmp_path.glob("ds*"))


def test_one_huge_document_never_becomes_all_of_val(tmp_path):
    folder = tmp_path / "two"
    folder.mkdir()
    (folder / "big.txt").write_text("a line of the big book\n" * 20_000)
    (folder / "small.txt").write_text("a short note\n" * 20)
    for seed in range(8):
        train, val = _split(local_source(str(folder)), SplitRule(val_fraction=0.1, seed=seed))
        assert sum(map(len, val)) <= 0.2 * sum(map(len, train + val)) and train


def test_a_big_single_text_file_is_still_cut_at_a_line_break(tmp_path, monkeypatch):
    monkeypatch.setattr(split, "SMALL_CORPUS_BYTES", 0)
    path = tmp_path / "book.txt"
    path.write_text("line\n" * 1000)
    train, val = _split(local_source(str(path)), SplitRule(val_fraction=0.1))
    assert train[0] + val[0] == "line\n" * 1000 and val[0].startswith("\n") and len(val[0]) == 501


@pytest.mark.parametrize("layout", ["crlf", "blank lines", "trailing spaces"])
def test_text_pieces_are_cut_in_every_line_layout(tmp_path, monkeypatch, layout):
    from gptrain.data import sources
    from gptrain.tokenizer.gpt2 import GPT2Tokenizer

    line = {"crlf": "{}\r\n", "blank lines": "{}\n\n", "trailing spaces": "{}  \n"}[layout]
    text = "".join(line.format(make_corpus_text(1, seed=i).strip()) for i in range(300))
    path = tmp_path / "t.txt"
    path.write_bytes(text.encode())
    monkeypatch.setattr(sources, "PIECE_BYTES", 1000)
    pieces = [p.text for p in sources.read_text_file(path)]
    assert len(pieces) > 10 and "".join(pieces) == text
    tok = GPT2Tokenizer()
    assert sum((tok.encode(p) for p in pieces), []) == tok.encode(text)


def test_a_folder_corpus_skips_gptrain_runs_and_datasets(corpus_dir, tmp_path):
    run = corpus_dir / "runs" / "x"
    run.mkdir(parents=True)
    (run / "config.toml").write_text("")
    (run / "metrics.jsonl").write_text('{"kind": "train"}\n')
    (corpus_dir / "data" / "ds").mkdir(parents=True)
    (corpus_dir / "data" / "ds" / "meta.json").write_text("{}")
    assert len(load_documents(local_source(str(corpus_dir)))) == 5


def test_the_exact_split_measures_the_corpus_once(corpus_dir, tmp_path, monkeypatch):
    real, calls = split.document_lengths, []
    monkeypatch.setattr(split, "document_lengths", lambda source: calls.append(1) or real(source))
    prepare_dataset(DataConfig(source=str(corpus_dir), data_dir=str(tmp_path / "ds")),
                    TokenizerConfig(kind="bpe", vocab_size=300), **QUIET)  # a fit pass and an encoding pass
    assert calls == [1]
