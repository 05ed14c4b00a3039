"""`gptrain data list|prepare|info`, the `prepare` alias, `gptrain tokenizer train` and `--tokenizer FILE`."""

import json

from gptrain.cli import main
from gptrain.data.catalogue import ENTRIES


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_data_list_names_every_entry_and_config_lists_the_new_keys(capsys):
    code, out, _ = run(capsys, "data", "list")
    assert code == 0
    for entry in ENTRIES.values():
        assert entry.name in out and entry.licence in out and entry.validation in out
    code, out, _ = run(capsys, "config")
    for key in ("val_source", "text_field", "num_workers", "val_tokens", "max_train_chars"):
        assert f"{key} =" in out


def test_data_prepare_info_and_the_prepare_alias(capsys, tmp_path, corpus_dir):
    out_dir = tmp_path / "ds"
    code, out, _ = run(capsys, "data", "prepare", str(corpus_dir), "--tokenizer", "gpt2", "--out", str(out_dir),
                       "--workers", "1")
    assert code == 0 and f"dataset ready: {out_dir}" in out
    meta = json.loads((out_dir / "meta.json").read_text())
    code, out, _ = run(capsys, "data", "info", str(out_dir))
    assert code == 0 and "tokenizer         gpt2" in out and f"{meta['num_train_tokens']:,} tokens" in out
    assert "magic 20240520 version 1, uint16" in out
    code, out, _ = run(capsys, "prepare", "--data", str(corpus_dir), "--tokenizer", "gpt2", "--out", str(out_dir))
    assert code == 0 and "dataset ready" in out  # reused as it is
    code, _, err = run(capsys, "data", "info", str(tmp_path / "missing"))
    assert code == 2 and err.count("\n") == 1 and "does not exist" in err


def test_tokenizer_train_then_train_with_that_file(capsys, tmp_path, corpus_dir):
    tok_file = tmp_path / "tok.json"
    code, out, _ = run(capsys, "tokenizer", "train", "--data", str(corpus_dir), "--vocab", "300", "--out",
                       str(tok_file))
    assert code == 0 and "vocabulary 300" in out and tok_file.is_file()
    code, out, _ = run(capsys, "data", "prepare", str(corpus_dir), "--tokenizer", str(tok_file),
                       "--out", str(tmp_path / "ds"))
    assert code == 0
    assert json.loads((tmp_path / "ds" / "meta.json").read_text())["vocab_size"] == 300
    assert (tmp_path / "ds" / "tokenizer.json").read_text() == tok_file.read_text()


def test_data_mistakes_are_one_line_and_leave_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv, message in [(["data", "prepare", "nosuchcorpus"], "neither a corpus in the catalogue"),
                          (["data", "prepare", str(tmp_path), "--tokenizer", "nope"], "tokenizer.kind must be"),
                          (["tokenizer", "train", "--tokenizer", "gpt2", "--out", str(tmp_path / "t.json")],
                           "only a bpe or char tokenizer is trained"),
                          (["data", "prepare", "--data.shard_tokens", str(2**31)], "data.shard_tokens must be")]:
        code, _, err = run(capsys, *argv)
        assert code == 2 and err.count("\n") == 1 and message in err, (argv, err)
    assert not list(tmp_path.iterdir())


def test_gptrain_offline_is_not_a_config_key_and_data_list_survives_a_closed_pipe(capsys, monkeypatch):
    monkeypatch.setenv("GPTRAIN_OFFLINE", "1")
    code, out, _ = run(capsys, "data", "list")
    assert code == 0 and "tinystories" in out
    import subprocess
    import sys

    done = subprocess.run(f"{sys.executable} -m gptrain data list | head -1", shell=True, capture_output=True,
                          text=True)
    assert done.stdout.count("\n") == 1 and "Traceback" not in done.stderr
