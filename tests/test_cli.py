"""The command line: every user mistake is one line on stderr and exit code 2, with nothing left behind."""

import re
import subprocess
import sys

import pytest

from gptrain.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def tiny_args(tmp_path, corpus):
    return ["--data", str(corpus), "--data.data_dir", str(tmp_path / "ds"), "--tokenizer", "char", "--embd", "32",
            "--layers", "2", "--heads", "2", "--context", "32", "--batch-size", "4", "--steps", "3",
            "--eval.every_steps=0", "--samples.every_steps=0", "--log.live=off", "--quiet",
            "--run-dir", str(tmp_path / "run")]


@pytest.mark.parametrize("argv,message", [
    (["train", "--preset", "gpt5"], "unknown preset 'gpt5'"),
    (["train", "--embd", "100", "--heads", "3"], "not divisible by model.n_head=3"),
    (["train", "--model.n_embdd=3"], "unknown config key 'model.n_embdd'"),
    (["train", "--data", "/no/such/corpus.txt"], "does not exist"),
    (["train", "/no/such/recipe.toml"], "config file /no/such/recipe.toml does not exist"),
    (["train", "--resume", "/no/such/run"], "run directory /no/such/run does not exist"),
    (["generate", "--checkpoint", "/no/such/ckpt"], "does not exist"),
    (["train", "--lr", "-1"], "peak_lr must be positive"),
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_user_mistakes_are_one_line_exit_2(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("gptrain: error: ") and message in err
    assert "Traceback" not in err


@pytest.mark.parametrize("content,message", [
    (b"", "is empty"),
    (b"\x00\x00binary\x00", "looks binary"),
    (b"tiny", "fewer than one context window"),
])
def test_bad_corpora_leave_nothing_behind(capsys, tmp_path, content, message):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(content)
    code, _, err = run_cli(capsys, "train", *tiny_args(tmp_path, corpus))
    assert code == 2 and message in err and err.count("\n") == 1
    assert not list(tmp_path.rglob("*.tmp")) and not (tmp_path / "run").exists()


def test_train_generate_and_existing_run_dir(capsys, tmp_path, corpus_dir):
    code, out, _ = run_cli(capsys, "train", *tiny_args(tmp_path, corpus_dir))
    assert code == 0 and "run directory:" in out
    code, _, err = run_cli(capsys, "train", *tiny_args(tmp_path, corpus_dir))
    assert code == 2 and "already exists" in err and "--resume" in err
    gen = ["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "KING", "--max-tokens", "25"]
    code, greedy1, _ = run_cli(capsys, *gen, "--greedy")
    code2, greedy2, _ = run_cli(capsys, *gen, "--greedy")
    assert code == code2 == 0 and greedy1 == greedy2 and greedy1.startswith("KING") and len(greedy1) == 4 + 25 + 1
    _, a, _ = run_cli(capsys, *gen, "--seed", "7", "--top-k", "5", "--top-p", "0.9", "--temperature", "1.2")
    _, b, _ = run_cli(capsys, *gen, "--seed", "7", "--top-k", "5", "--top-p", "0.9", "--temperature", "1.2")
    assert a == b
    for bad, message in [(["--temperature", "nan"], "temperature must be a finite number"),
                         (["--temperature", "inf"], "temperature must be a finite number"),
                         (["--num-samples", "0"], "--num-samples must be at least 1"),
                         (["--seed", "-1"], "seed must be >= 0"), (["--top-k", "-3"], "top_k must be >= 0")]:
        code, _, err = run_cli(capsys, *gen, *bad)
        assert code == 2 and message in err and err.count("\n") == 1, (bad, err)
    run = str(tmp_path / "run")
    for bad, message in [(["eval-every", "2.5"], "a whole number of steps"), (["lr", "nan"], "must be > 0"),
                         (["pause", "--timeout", "nan"], "the timeout must be a positive number")]:
        code, _, err = run_cli(capsys, "control", run, *bad)
        assert code == 2 and message in err and err.count("\n") == 1, (bad, err)
    code, _, err = run_cli(capsys, "train", "--resume", str(tmp_path / "run"), "--steps", "5", "--quiet")
    assert code == 2 and "--schedule.extend=hold" in err and "--init-from" in err and "Traceback" not in err
    code, out, _ = run_cli(capsys, "train", "--resume", str(tmp_path / "run"), "--steps", "5", "--quiet",
                           "--schedule.extend=hold")
    assert code == 0


def test_presets_lists_every_preset_with_counts(capsys):
    from gptrain.presets import PRESETS

    code, out, _ = run_cli(capsys, "presets")
    assert code == 0
    for name in PRESETS:
        assert f"\n{name} " in out
    gpt2_line = next(line for line in out.splitlines() if line.startswith("gpt2 "))
    assert "124.44M" in gpt2_line


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "gptrain", "presets"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "feste-tiny" in result.stdout


def test_demo_tours_every_part(capsys):
    code, out, _ = run_cli(capsys, "demo")
    assert code == 0
    for heading in ("1. tokenizers", "2. a tiny GPT-2", "3. forward pass", "4. generation", "5. evaluation",
                    "6. training"):
        assert heading in out
    assert "Sh|all| I| compare| thee" in out  # the GPT-2 tokenizer's pieces
    first = float(re.search(r"5\. evaluation.*?val loss (\d+\.\d+)", out, re.S).group(1))
    best = float(re.search(r"-> best (\d+\.\d+)", out).group(1))
    assert best < first  # training lowered the held-out loss


def test_overwrite_only_replaces_runs(capsys, tmp_path, corpus_dir):
    precious = tmp_path / "run"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    code, _, err = run_cli(capsys, "train", *tiny_args(tmp_path, corpus_dir), "--overwrite")
    assert code == 2 and "not a gptrain run" in err
    assert (precious / "thesis.txt").read_text() == "years of work"


def test_unknown_gptrain_environment_variable(capsys, monkeypatch):
    monkeypatch.setenv("GPTRAIN_STEP", "5")
    code, _, err = run_cli(capsys, "train")
    assert code == 2 and "unknown setting GPTRAIN_STEP" in err


def test_resume_refuses_overwrite_and_run_dir_that_is_a_file(capsys, tmp_path, corpus_dir):
    code, _, _ = run_cli(capsys, "train", *tiny_args(tmp_path, corpus_dir))
    assert code == 0
    code, _, err = run_cli(capsys, "train", "--resume", str(tmp_path / "run"), "--overwrite")
    assert code == 2 and "cannot be combined" in err
    assert (tmp_path / "run" / "checkpoints" / "final" / "model.safetensors").is_file()
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    code, _, err = run_cli(capsys, "train", "--run-dir", str(a_file))
    assert code == 2 and "is a file" in err


def test_overwrite_never_deletes_the_working_directory(capsys, tmp_path, corpus_dir, monkeypatch):
    code, _, _ = run_cli(capsys, "train", *tiny_args(tmp_path, corpus_dir))
    monkeypatch.chdir(tmp_path / "run")  # the run directory is now the working directory
    args = [a if a != str(tmp_path / "run") else "." for a in tiny_args(tmp_path, corpus_dir)]
    code, _, err = run_cli(capsys, "train", *args, "--overwrite")
    assert code == 2 and "not a gptrain run" in err and (tmp_path / "run" / "config.toml").is_file()


def test_a_crash_is_one_line_with_the_traceback_in_the_run_and_resume_restarts_it(capsys, tmp_path, corpus_dir,
                                                                                    monkeypatch):
    import json

    from gptrain.train import loop

    def crash(run):  # a bug in the loop, not the user's mistake
        raise RuntimeError("boom\nsecond line")

    real = loop._loop
    monkeypatch.setattr(loop, "_loop", crash)
    code, _, err = run_cli(capsys, "train", *tiny_args(tmp_path, corpus_dir))
    run = tmp_path / "run"
    assert code == 1 and err.count("\n") == 1 and "crashed: RuntimeError: boom (the traceback is in" in err
    assert "Traceback (most recent call last)" in (run / "crash.log").read_text() and "Traceback" not in err
    monkeypatch.setattr(loop, "_loop", real)
    # Killed (here: crashed) before its first checkpoint: --resume starts it again at step 0, in place.
    code, out, _ = run_cli(capsys, "train", "--resume", str(run), "--quiet")
    assert code == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]
    state = json.loads((run / "checkpoints" / "final" / "state.json").read_text())
    assert state["is_complete"] is True


def test_exit_codes_are_documented_in_the_readme():
    from pathlib import Path

    from gptrain.errors import EXIT_CODES

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for code in EXIT_CODES:
        assert f"| {code} |" in readme


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_mistakes_are_refused_before_any_data_is_prepared_or_run_changed(capsys, tmp_path, corpus_dir):
    for bad, message in [(["--schedule.num_warmup_steps", "3"], "num_warmup_steps=3 is not below the run's 3 steps"),
                         (["--train.batch_tokens", "100"], "train.batch_tokens=100 is not a multiple")]:
        code, _, err = run_cli(capsys, "train", *tiny_args(tmp_path, corpus_dir), *bad)
        assert code == 2 and message in err and err.count("\n") == 1
        assert not (tmp_path / "ds").exists() and not (tmp_path / "run").exists()
    assert run_cli(capsys, "train", *tiny_args(tmp_path, corpus_dir))[0] == 0
    run = tmp_path / "run"
    before = _tree(run), _tree(tmp_path / "ds")
    other = tmp_path / "other.txt"
    other.write_text("another corpus entirely\n" * 200)
    for bad, message in [(["--context", "16"], "its model.block_size is 32, not 16"),
                         (["--data", str(other)], "its data.source is"), (["--seed", "3"], "its seed is 1337")]:
        code, _, err = run_cli(capsys, "train", "--resume", str(run), *bad)
        assert code == 2 and message in err and "--init-from" in err, err
    assert (_tree(run), _tree(tmp_path / "ds")) == before  # nothing prepared, nothing written
