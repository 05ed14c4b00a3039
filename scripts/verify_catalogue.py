"""Check the data catalogue against the real sources (needs the internet; downloads no data): each pinned Hub
revision exists, each listed file is there at it with the catalogue's size, and each URL answers with its size.

    python scripts/verify_catalogue.py                     # every entry; exit status 1 on any problem
    python scripts/verify_catalogue.py --entry wikitext-2  # one entry (repeat --entry for more)
    python scripts/verify_catalogue.py --print-latest      # each repository's current main commit, to re-pin

huggingface_hub honours HF_ENDPOINT and HF_TOKEN as usual (the tests point HF_ENDPOINT at a fake Hub).
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from dataclasses import astuple, dataclass
from pathlib import PurePosixPath
from urllib.parse import urlsplit

from gptrain.data.catalogue import ENTRIES, Entry, find_entry

TIMEOUT_SECONDS = 30.0
PASSING = ("ok", "skipped")


@dataclass(frozen=True)
class Row:
    entry: str
    file: str
    expected: str
    found: str
    status: str  # ok, MISMATCH, missing, unknown, error, skipped


def expected_size(entry: Entry, name: str) -> int | None:
    """The catalogue's byte count of a file, keyed by its path or base name (as catalogue._fetch looks it up)."""
    return entry.file_sizes.get(name) or entry.file_sizes.get(PurePosixPath(name).name)


def _count(num_bytes: int | None) -> str:
    return "-" if num_bytes is None else f"{num_bytes:,}"


def size_row(entry: Entry, name: str, found: int | None, label: str = "") -> Row:
    """ok, MISMATCH (a size the catalogue lists differs) or missing (the source does not have the file)."""
    expected = expected_size(entry, name)
    status = "missing" if found is None else "MISMATCH" if expected is not None and found != expected else "ok"
    return Row(entry.name, label or name, _count(expected), _count(found), status)


def check_hub_entry(entry: Entry, api) -> list[Row]:
    """The revision resolves to itself (a commit, not a branch), then each file's size in the tree listing."""
    from huggingface_hub import RepoFile
    from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        sha = api.dataset_info(entry.repo, revision=entry.revision).sha or ""
    except RepositoryNotFoundError:
        return [Row(entry.name, entry.repo, "repository", "-", "missing")]
    except RevisionNotFoundError:
        return [Row(entry.name, "revision", entry.revision[:12], "-", "missing")]
    rows = [Row(entry.name, "revision", entry.revision[:12], sha[:12] or "-",
                "ok" if sha == entry.revision else "MISMATCH")]
    files = entry.train_files + entry.val_files
    sizes: dict[str, int] = {}
    for folder in sorted({str(PurePosixPath(f).parent) for f in files}):
        try:
            items = api.list_repo_tree(entry.repo, path_in_repo=None if folder == "." else folder,
                                       revision=entry.revision, repo_type="dataset")
            # lfs.size is an LFS file's real size (git itself stores a small pointer file).
            sizes |= {i.path: i.lfs.size if i.lfs else i.size for i in items if isinstance(i, RepoFile)}
        except RemoteEntryNotFoundError:
            pass  # no such folder: its files show as missing
    return rows + [size_row(entry, f, sizes.get(f)) for f in files]


def head_size(url: str) -> int | None:
    """Content-Length of a HEAD request; None for a 404. Other HTTP errors raise."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=TIMEOUT_SECONDS) as r:
            length = r.headers.get("Content-Length")
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise
    return -1 if length is None else int(length)


def check_url_entry(entry: Entry) -> list[Row]:
    """The revision is part of every URL (so the bytes are pinned), then each URL's Content-Length."""
    files = entry.train_files + entry.val_files
    is_pinned = all(entry.revision in url for url in files)
    rows = [Row(entry.name, "revision", entry.revision[:12], "in URL" if is_pinned else "not in URL",
                "ok" if is_pinned else "MISMATCH")]
    for url in files:
        name = PurePosixPath(urlsplit(url).path).name
        found = head_size(url)
        if found == -1:
            rows.append(Row(entry.name, name, _count(expected_size(entry, url)), "no length", "unknown"))
        else:
            rows.append(size_row(entry, url, found, label=name))
    return rows


def check_entry(entry: Entry, api) -> list[Row]:
    if entry.repo:
        return check_hub_entry(entry, api)
    if entry.train_files:
        return check_url_entry(entry)
    return [Row(entry.name, entry.revision, "-", "-", "skipped")]  # an installed package: nothing online


def format_table(rows: list[Row]) -> str:
    table = [astuple(Row("entry", "file", "expected", "found", "status")), *map(astuple, rows)]
    widths = [max(len(cells[i]) for cells in table) for i in range(5)]
    return "\n".join("  ".join(cell.rjust(w) if i in (2, 3) else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(cells, widths))).rstrip() for cells in table)


def verify(entries: list[Entry]) -> int:
    """Print the table of every check; 1 if any is not ok."""
    from huggingface_hub import HfApi

    api = HfApi()
    rows: list[Row] = []
    for entry in entries:
        try:
            rows += check_entry(entry, api)
        except Exception as e:  # a network or server failure for one entry; the others still get checked
            rows.append(Row(entry.name, "-", "-", (str(e).splitlines() or [type(e).__name__])[0][:60], "error"))
    print(format_table(rows))
    problems = [r for r in rows if r.status not in PASSING]
    print(f"\n{len(problems)} problem(s)" if problems else "\nall ok")
    return 1 if problems else 0


def print_latest(entries: list[Entry]) -> int:
    """Each repository's current main commit next to the pinned one."""
    from huggingface_hub import HfApi

    api, status = HfApi(), 0
    for repo in dict.fromkeys(e.repo for e in entries if e.repo):
        pinned = sorted({e.revision for e in entries if e.repo == repo})
        try:
            latest = api.dataset_info(repo).sha
        except Exception as e:
            print(f"{repo}: {(str(e).splitlines() or [type(e).__name__])[0]}")
            status = 1
            continue
        state = "up to date" if pinned == [latest] else "main has moved: check the files, then re-pin"
        print(f"{repo:<28} main {latest}  pinned {', '.join(pinned)}  {state}")
    for e in entries:
        if not e.repo and e.train_files:
            print(f"{e.name:<28} a plain URL pinned at {e.revision}: look its host up by hand")
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entry", action="append", metavar="NAME", help="check this entry only (repeatable)")
    parser.add_argument("--print-latest", action="store_true", help="print each repository's main commit")
    args = parser.parse_args(argv)
    entries = []
    for name in args.entry or list(ENTRIES):
        if (entry := find_entry(name)) is None:
            parser.error(f"no entry {name!r} in the catalogue ({', '.join(ENTRIES)})")
        entries.append(entry)
    return print_latest(entries) if args.print_latest else verify(entries)


if __name__ == "__main__":
    sys.exit(main())
