"""Every downloadable catalogue entry, prepared for real from small fixtures in its real format, served by a
fake Hub at the entry's own repository, revision and file paths (or URL path); and the online checker.

Preparation runs in a subprocess (huggingface_hub reads HF_ENDPOINT at import). The catalogue holds the real
file sizes (and FineWeb's 100M val tokens), so the subprocess patches just those, and tinyshakespeare's host.
"""

import gzip
import importlib.util
import io
import json
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fake_hub import FakeHub  # tests/ is on sys.path: conftest.py lives there

from gptrain import cli
from gptrain.data.catalogue import ENTRIES
from gptrain.data.dataset import shard_paths
from gptrain.data.shards import open_shard
from gptrain.tokenizer import load_tokenizer
from gptrain.tokenizer.gpt2_assets import FILE_NAME, encoding_path

EOT = 50256
FINEWEB_VAL_TOKENS = 37  # small, and inside a document: the cut is by tokens, not documents
OFFICIAL_VAL = ("tinystories", "tinystories-v1", "wikitext-2", "wikitext-103", "helpsteer2")
FINEWEB = ("fineweb-10B", "fineweb-edu-10B")
DOWNLOADABLE = ("tinyshakespeare", *OFFICIAL_VAL, *FINEWEB)
SCRIPT = Path(__file__).parents[2] / "scripts" / "verify_catalogue.py"

PREPARE = """
import dataclasses, json, sys
from gptrain import cli
from gptrain.data import catalogue

out, patches = sys.argv[1], json.loads(sys.argv[2])
for name, fields in patches.items():  # the fixture's sizes, a small val_tokens, the fake server's URL
    fields = {k: tuple(v) if k == "train_files" else v for k, v in fields.items()}
    catalogue.ENTRIES[name] = dataclasses.replace(catalogue.ENTRIES[name], **fields)
argv = ["data", "prepare", "--tokenizer", "gpt2", "--workers", "1", "--out"]
print(json.dumps({name: cli.main([*argv, f"{out}/{name}", name]) for name in sys.argv[3:]}))
"""


class PinnedHub(FakeHub):
    """A FakeHub that serves each repository at its own commit, as the Hub does for a pinned revision.

    FakeHub has one commit for all repositories; its handler looks the repository up (hub.repo) before it
    reads hub.commit, in the request's own thread, so the commit is that of the repository last looked up.
    """

    def __init__(self, files: dict[str, bytes], commits: dict[str, str]):
        self._commits, self._local = commits, threading.local()
        super().__init__(files)

    @property
    def commit(self) -> str:
        return self._commits.get(getattr(self._local, "repo_id", None), self._default_commit)

    @commit.setter
    def commit(self, value: str) -> None:
        self._default_commit = value

    def repo(self, repo_type: str, repo_id: str):
        self._local.repo_id = repo_id
        return super().repo(repo_type, repo_id)


def pinned_hub(files: dict[str, bytes]) -> PinnedHub:
    return PinnedHub(files, {e.repo: e.revision for e in ENTRIES.values() if e.repo})


# TinyStories: stories separated by <|endoftext|> lines (a blank story is skipped, each story is stripped).
TINYSTORIES = {
    "TinyStoriesV2-GPT4-train.txt": (
        "Once upon a time, there was a little girl named Lily. She liked to play in the park.\n"
        "One day, she saw a big, red ball.\n\n"
        "Lily said, \u201cCan I play with you?\u201d The ball was happy.\n<|endoftext|>\n"
        "Tom had a toy car. It was fast.\n<|endoftext|>\n<|endoftext|>\n"
        "   Sue was sad. Her cat ran away.   \nThen the cat came home. Sue smiled.\n",
        ["Once upon a time, there was a little girl named Lily. She liked to play in the park.\n"
         "One day, she saw a big, red ball.\n\nLily said, \u201cCan I play with you?\u201d The ball was happy.",
         "Tom had a toy car. It was fast.", "Sue was sad. Her cat ran away.   \nThen the cat came home. Sue smiled."]),
    "TinyStoriesV2-GPT4-valid.txt": (
        "\nBen found a shiny stone. He gave it to his mom.\n<|endoftext|>\nThe sun was hot.\n<|endoftext|>\n",
        ["Ben found a shiny stone. He gave it to his mom.", "The sun was hot."]),
    "TinyStories-train.txt": (
        "A dog named Max liked bones.\n<|endoftext|>\nMia baked a cake for her friend.\n\nIt was yummy.\n",
        ["A dog named Max liked bones.", "Mia baked a cake for her friend.\n\nIt was yummy."]),
    "TinyStories-valid.txt": ("The bird sang a song.\n<|endoftext|>\n", ["The bird sang a song."]),
}

# WikiText: one Parquet row per line; an article starts at a " = Title = " row, subheadings are " = = x = = ".
ARTICLES = {
    "valkyria": ["", " = Valkyria Chronicles III = \n", "",
                 " Senj\u014d no Valkyria 3 : Unrecorded Chronicles is a tactical role @-@ playing video game . \n", "",
                 " = = Gameplay = = \n", "", " As with previous games , battles are fought in turns . \n", "",
                 " = = = Plot = = = \n", "", " The story follows Squad 422 . \n", ""],
    "arsenal": [" = Tower Building of the Little Rock Arsenal = \n", "", " The building was built in 1840 . \n", ""],
    "robert": ["", " = Robert Boulter = \n", "", " Robert Boulter is an English film and television actor . \n",
               "", " = = Career = = \n", "", " In 2000 Boulter had a guest role . \n", ""],
    "du_fu": [" = Du Fu = \n", "", " Du Fu ( 712 \u2013 770 ) was a prominent Chinese poet . \n", ""],
    "storm": ["", " = Tropical Storm Bonnie = \n", "", " Bonnie formed on August 16 . \n", ""],
}
WIKITEXT = {
    "wikitext-2-raw-v1/train-00000-of-00001.parquet": ["valkyria", "arsenal"],
    "wikitext-2-raw-v1/validation-00000-of-00001.parquet": ["robert"],
    "wikitext-103-raw-v1/train-00000-of-00002.parquet": ["arsenal", "valkyria"],
    "wikitext-103-raw-v1/train-00001-of-00002.parquet": ["du_fu"],
    "wikitext-103-raw-v1/validation-00000-of-00001.parquet": ["storm", "robert"],
}

# HelpSteer2: JSON lines with ratings; a prompt repeats with its second response; multi-turn prompts.
HELPSTEER2_FIELDS = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
HELPSTEER2 = {
    "train.jsonl.gz": [("What is 2 + 2?", "2 + 2 = 4."), ("What is 2 + 2?", "Four."),
                       ("Write a haiku about rain.\n<extra_id_1>Assistant\nRain taps the window.\n"
                        "<extra_id_1>User\nShorter, please.", "Rain.\nSoft rain.\nGone.")],
    "validation.jsonl.gz": [("Name a prime number.", "7 is prime: its only divisors are 1 and 7.")],
}


def parquet_bytes(columns: dict[str, list]) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer)
    return buffer.getvalue()


def fineweb_rows(name: str, index: int) -> dict[str, list]:
    """Two or three pages of a FineWeb sample-10BT file with its real columns (FineWeb-Edu adds scores)."""
    texts = [f"{name} file {index:03d} page {row}: caf\u00e9 prices rose.\nSee the table below." * (1 + row)
             for row in range(2 + index % 2)]
    n = len(texts)
    columns = {"text": texts, "id": [f"<urn:uuid:{index:04d}-{row}>" for row in range(n)],
               "dump": ["CC-MAIN-2013-20"] * n, "url": [f"http://example.com/{index}/{row}" for row in range(n)]}
    if name == "fineweb-10B":
        columns["date"] = ["2013-05-18T05:48:54Z"] * n
    columns |= {"file_path": ["s3://commoncrawl/crawl-data/CC-MAIN-2013-20/segments/x.warc.gz"] * n,
                "language": ["en"] * n, "language_score": [0.93] * n, "token_count": [12 * (r + 1) for r in range(n)]}
    if name == "fineweb-edu-10B":
        columns |= {"score": [3.1] * n, "int_score": [3] * n}
    return columns


def build_fixtures(folder: Path) -> tuple[dict[str, bytes], dict[str, dict[str, list[str]]]]:
    """Files in their real formats (written under folder), keyed for the fake Hub; each entry's expected documents."""
    contents: dict[str, bytes] = {}
    docs: dict[str, dict[str, list[str]]] = {}
    for name, entry in ENTRIES.items():
        for split, files in (("train", entry.train_files), ("val", entry.val_files)):
            for path in files:
                if entry.reader == "tinystories":
                    raw, expected = TINYSTORIES[path][0].encode(), TINYSTORIES[path][1]
                elif entry.reader == "wikitext":
                    rows = [row for article in WIKITEXT[path] for row in ARTICLES[article]]
                    raw = parquet_bytes({"text": rows})
                    expected = ["".join(ARTICLES[article]).strip() for article in WIKITEXT[path]]
                elif entry.reader == "helpsteer2":
                    records = [{"prompt": p, "response": r} | {k: i % 5 for k in HELPSTEER2_FIELDS}
                               for i, (p, r) in enumerate(HELPSTEER2[path])]
                    raw = gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode())
                    expected = [f"{r['prompt']}\n\n{r['response']}" for r in records]
                elif entry.reader == "parquet":
                    columns = fineweb_rows(name, int(path.split("/")[-1][:3]))
                    raw, expected = parquet_bytes(columns), columns["text"]
                else:  # tinyshakespeare: one plain text file
                    raw = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
                           "First Citizen:\nYou are all resolved rather to die than to famish?\n\n" * 8).encode()
                    path, expected = urlsplit(path).path.lstrip("/"), [raw.decode()]
                key = f"datasets/{entry.repo}/{path}" if entry.repo else path
                (folder / key).parent.mkdir(parents=True, exist_ok=True)
                (folder / key).write_bytes(raw)
                contents[key] = (folder / key).read_bytes()
                docs.setdefault(name, {}).setdefault(split, []).extend(expected)
    return contents, docs


def patches(hub: FakeHub, contents: dict[str, bytes]) -> dict[str, dict]:
    """The fixture's sizes where the catalogue lists sizes, FineWeb's small val, tinyshakespeare's fake host."""
    url = ENTRIES["tinyshakespeare"].train_files[0]
    found = {name: {"file_sizes": {path: len(contents[f"datasets/{e.repo}/{path}"]) for path in e.file_sizes}}
             for name, e in ENTRIES.items() if e.repo and e.file_sizes}
    found["tinyshakespeare"] = {"train_files": [hub.url + urlsplit(url).path],
                                "file_sizes": {"input.txt": len(contents[urlsplit(url).path.lstrip("/")])}}
    for name in FINEWEB:
        found[name]["val_tokens"] = FINEWEB_VAL_TOKENS
    return found


def prepare(env: dict[str, str], out: Path, fields: dict[str, dict], names=DOWNLOADABLE) -> dict[str, int]:
    done = subprocess.run([sys.executable, "-c", PREPARE, str(out), json.dumps(fields), *names], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@dataclass
class Prepared:
    hub: PinnedHub
    env: dict[str, str]
    root: Path
    fields: dict[str, dict]
    docs: dict[str, dict[str, list[str]]]
    codes: dict[str, int]
    requests: list[tuple]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("catalogue")
    contents, docs = build_fixtures(root / "fixtures")
    (root / "cache").mkdir()
    shutil.copy(encoding_path(should_download=False), root / "cache" / FILE_NAME)  # GPTRAIN_CACHE is new
    with pinned_hub(contents) as hub:
        env = hub.env(root / "hf") | {"GPTRAIN_CACHE": str(root / "cache"), "GPTRAIN_GPT2_URL": f"{hub.url}/none"}
        env.pop("GPTRAIN_OFFLINE", None)
        fields = patches(hub, contents)
        codes = prepare(env, root / "run1", fields)
        yield Prepared(hub, env, root, fields, docs, codes, list(hub.requests))


def tokens_of(folder: Path, split: str) -> np.ndarray:
    return np.concatenate([np.asarray(open_shard(p)) for p in shard_paths(folder, split)])


def documents(folder: Path, tokens: np.ndarray) -> list[str]:
    """The texts of a token stream that starts with EOT, cut at each EOT, decoded with the dataset's tokenizer."""
    assert tokens[0] == EOT
    tokenizer = load_tokenizer(folder / "tokenizer.json")
    starts = [*np.flatnonzero(tokens == EOT), len(tokens)]
    return [tokenizer.decode(tokens[a + 1 : b].tolist()) for a, b in zip(starts, starts[1:])]


def meta(folder: Path) -> dict:
    return json.loads((folder / "meta.json").read_text())


@pytest.mark.parametrize("name", OFFICIAL_VAL)
def test_documents_round_trip_and_the_official_val_files_are_val(prepared, name):
    folder = prepared.root / "run1" / name
    assert prepared.codes[name] == 0
    assert documents(folder, tokens_of(folder, "train")) == prepared.docs[name]["train"]
    assert documents(folder, tokens_of(folder, "val")) == prepared.docs[name]["val"]
    assert meta(folder)["source"] == name and meta(folder)["val_rule"] == f"val source {name}:val"


@pytest.mark.parametrize("name", FINEWEB)
def test_fineweb_val_is_the_first_tokens_of_the_file_order_stream(prepared, name):
    folder = prepared.root / "run1" / name
    assert prepared.codes[name] == 0
    val, train = tokens_of(folder, "val"), tokens_of(folder, "train")
    assert len(val) == FINEWEB_VAL_TOKENS and train[0] != EOT  # cut inside a document, as llm.c's shards are
    assert documents(folder, np.concatenate([val, train])) == prepared.docs[name]["train"]  # files 000, 001, ...
    assert meta(folder)["source"] == name and meta(folder)["num_val_tokens"] == FINEWEB_VAL_TOKENS


def test_tinyshakespeare_is_one_document_cut_for_val_at_a_line_break(prepared):
    folder = prepared.root / "run1" / "tinyshakespeare"
    assert prepared.codes["tinyshakespeare"] == 0
    (train,), (val,) = documents(folder, tokens_of(folder, "train")), documents(folder, tokens_of(folder, "val"))
    (text,) = prepared.docs["tinyshakespeare"]["train"]
    assert train + val == text and val.startswith("\n") and 0.05 < len(val) / len(text) < 0.2
    assert meta(folder)["source"] == "tinyshakespeare"
    assert [p.name for p in (prepared.root / "cache" / "downloads").rglob("*") if p.is_file()] == ["input.txt"]


def test_every_file_comes_from_its_entry_repository_revision_and_path(prepared):
    fetched = {path for method, path, _ in prepared.requests if method == "GET"}
    for name in DOWNLOADABLE:
        entry = ENTRIES[name]
        for path in entry.train_files + entry.val_files:
            key = f"datasets/{entry.repo}/{path}"
            wanted = prepared.hub.resolve_path(key, entry.revision) if entry.repo else urlsplit(path).path
            assert wanted in fetched, (name, wanted)


def test_a_second_run_downloads_nothing_and_writes_the_same_shards(prepared):
    num_requests = len(prepared.hub.requests)
    codes = prepare(prepared.env, prepared.root / "run2", prepared.fields)  # a new --out: sources re-resolved
    assert set(codes.values()) == {0} and len(prepared.hub.requests) == num_requests
    for name in DOWNLOADABLE:
        for split in ("train", "val"):
            first, second = (shard_paths(prepared.root / run / name, split) for run in ("run1", "run2"))
            assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


def test_a_file_of_the_wrong_size_is_a_one_line_error(prepared, tmp_path):
    # No patch: the catalogue's real size of TinyStoriesV2-GPT4-train.txt (2.2 GB) meets the small fixture.
    env = prepared.env | {"HF_HOME": str(tmp_path / "hf")}
    out = tmp_path / "tinystories"
    done = subprocess.run([sys.executable, "-m", "gptrain", "data", "prepare", "tinystories", "--tokenizer", "gpt2",
                           "--workers", "1", "--out", str(out)], env=env, capture_output=True, text=True, timeout=60)
    expected = ENTRIES["tinystories"].file_sizes["TinyStoriesV2-GPT4-train.txt"]
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("gptrain: error: roneneldan/TinyStories/TinyStoriesV2-GPT4-train.txt@")
    assert f"not the {expected} the catalogue expects" in line
    assert not (out / "meta.json").exists()


def test_data_list_names_every_entry_with_its_licence_and_revision(capsys):
    assert cli.main(["data", "list"]) == 0
    blocks: dict[str, str] = {}
    name = ""
    for line in capsys.readouterr().out.splitlines():  # an entry's block: its name line, then indented lines
        name = line.split("  ")[0] if line[:1].strip() else name
        blocks[name] = blocks.get(name, "") + line + "\n"
    for entry in ENTRIES.values():
        assert entry.licence in blocks[entry.name] and entry.revision in blocks[entry.name], entry.name
        if entry.repo:
            assert re.fullmatch(r"[0-9a-f]{40}", entry.revision), entry.name
        elif entry.train_files:
            assert all(entry.revision in url for url in entry.train_files), entry.name  # the URL is pinned


def verify(hub: FakeHub, tmp_path: Path, *args: str) -> tuple[int, dict[tuple[str, str], list[str]]]:
    """scripts/verify_catalogue.py against the fake Hub: (exit status, {(entry, file): [expected, found, status]})."""
    done = subprocess.run([sys.executable, str(SCRIPT), *args], env=hub.env(tmp_path / "hf"), capture_output=True,
                          text=True, timeout=60)
    assert "Traceback" not in done.stderr, done.stderr
    rows = [line.split() for line in done.stdout.splitlines()]
    return done.returncode, {(r[0], r[1]): r[2:] for r in rows if len(r) == 5 and r[0] in ENTRIES}


def test_verify_catalogue_reports_ok_mismatch_and_missing(tmp_path):
    valid = ENTRIES["tinystories"].file_sizes["TinyStoriesV2-GPT4-valid.txt"]
    files = {"datasets/Salesforce/wikitext/wikitext-2-raw-v1/train-00000-of-00001.parquet": b"PAR1 train",
             "datasets/Salesforce/wikitext/wikitext-2-raw-v1/validation-00000-of-00001.parquet": b"PAR1 val",
             "datasets/roneneldan/TinyStories/TinyStoriesV2-GPT4-valid.txt": b"x" * valid,  # the real size
             "datasets/roneneldan/TinyStories/TinyStoriesV2-GPT4-train.txt": b"Once upon a time.\n"}
    with pinned_hub(files) as hub:
        status, rows = verify(hub, tmp_path, "--entry", "wikitext-2")
        assert status == 0 and [r[-1] for r in rows.values()] == ["ok"] * 3
        assert rows["wikitext-2", "wikitext-2-raw-v1/train-00000-of-00001.parquet"] == ["-", "10", "ok"]
        status, rows = verify(hub, tmp_path, "--entry", "tinystories", "--entry", "tinystories-v1")
        assert status == 1
        assert rows["tinystories", "revision"][-1] == "ok"
        assert rows["tinystories", "TinyStoriesV2-GPT4-valid.txt"] == [f"{valid:,}", f"{valid:,}", "ok"]
        assert rows["tinystories", "TinyStoriesV2-GPT4-train.txt"] == ["2,227,753,162", "18", "MISMATCH"]
        assert rows["tinystories-v1", "TinyStories-train.txt"][-1] == "missing"
        latest = subprocess.run([sys.executable, str(SCRIPT), "--print-latest", "--entry", "wikitext-2"],
                                env=hub.env(tmp_path / "hf"), capture_output=True, text=True, timeout=60)
        assert latest.returncode == 0 and f"main {ENTRIES['wikitext-2'].revision}" in latest.stdout
        assert "up to date" in latest.stdout


def test_verify_catalogue_heads_each_url_for_its_size(monkeypatch):
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    spec = importlib.util.spec_from_file_location("verify_catalogue", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, script)  # dataclasses look their module up there
    spec.loader.exec_module(script)  # importing it runs nothing
    entry = ENTRIES["tinyshakespeare"]
    path = urlsplit(entry.train_files[0]).path
    with FakeHub({path.lstrip("/"): b"x" * entry.file_sizes["input.txt"]}) as hub:
        rows = script.check_url_entry(replace(entry, train_files=(hub.url + path,)))
        assert [(r.file, r.found, r.status) for r in rows] == [("revision", "in URL", "ok"),
                                                                ("input.txt", "1,115,394", "ok")]
        assert all(method == "HEAD" for method, _, _ in hub.requests)
        rows = script.check_url_entry(replace(entry, train_files=(f"{hub.url}/elsewhere/input.txt",)))
        assert [r.status for r in rows] == ["MISMATCH", "missing"]  # not pinned by the URL, and a 404
