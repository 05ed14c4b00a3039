"""A prepared dataset is durable before it gets its name: every file and the folder are fsynced, then
the folder is swapped in."""

from gptrain.data import prepare
from gptrain.data.prepare import DataConfig, prepare_dataset
from gptrain.tokenizer import TokenizerConfig

QUIET = dict(log=lambda *_: None)


def test_every_file_of_a_dataset_and_its_folder_are_fsynced_before_the_swap(corpus_dir, tmp_path, monkeypatch):
    events = []
    real_swap_in = prepare.swap_in
    monkeypatch.setattr(prepare, "fsync_file", lambda path: events.append(("file", path.name)))
    monkeypatch.setattr(prepare, "fsync_dir", lambda path: events.append(("dir", path.name)))
    monkeypatch.setattr(prepare, "swap_in", lambda tmp, folder: (events.append(("swap", tmp.name)),
                                                                 real_swap_in(tmp, folder)))
    folder = prepare_dataset(DataConfig(source=str(corpus_dir), data_dir=str(tmp_path / "ds"), shard_tokens=2000,
                                        num_workers=1), TokenizerConfig(kind="gpt2"), **QUIET)
    *files, synced_dir, swapped = events
    assert {name for kind, name in files if kind == "file"} == {p.name for p in folder.iterdir()}
    assert {"meta.json", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert synced_dir[0] == "dir" and swapped[0] == "swap" and synced_dir[1] == swapped[1]
