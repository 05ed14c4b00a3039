"""The README's Python example runs as written (on the built-in corpus, in a temp folder)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    block = re.search(r"## From Python\n+```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    fixture = Path(__file__).parent / "fixtures" / "hellaswag_fixture.jsonl"
    (tmp_path / "my_hellaswag.jsonl").write_text(fixture.read_text())  # the example's local HellaSwag file
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    summary, ckpt = namespace["summary"], namespace["ckpt"]
    assert summary["step"] == 300 and summary["val_loss"] < 6.0  # ln(512) = 6.24 at the start
    assert ckpt.tokenizer.decode(namespace["ids"]) == "ROMEO.\n"
    assert namespace["out"].shape == (1, len(namespace["ids"]) + 20)
    assert (tmp_path / "runs" / "api-demo" / "checkpoints" / "final" / "model.safetensors").is_file()
    printed = capsys.readouterr().out
    assert "'bpb'" in printed and "'acc_norm_bytes'" in printed  # evaluate() and hellaswag() ran
