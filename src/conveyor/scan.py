"""Scanning a field-test tree for Spotbot logs: the `logs_to_process` request that
processes every one of them (the seed's ETL step, `conveyor scan`).

Each file whose name matches the pattern (`rawbinlog.bin`) is one log. Its siblings
share its name up to the last suffix: `rawbinlog.time` (the time index) and
`rawbinlog.protocols.xml` (the protocol list); the output goes to its folder. A log
missing a sibling cannot be processed: it is left out of the request and reported in
`Scan.incomplete`, so one broken device log does not hold up a whole field test (the
CLI warns about each, and `--strict` refuses instead).

`plan` decides everything from a listing of the tree and is pure; `scan_tree` walks a
real tree (the only I/O) and hands its listing to `plan`.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Collection, Iterable
from dataclasses import dataclass, replace
from pathlib import Path, PurePath
from typing import Any

DEFAULT_PATTERN = "rawbinlog.bin"
SPLIT_KEY = "logs_to_process"


@dataclass(frozen=True)
class LogFiles:
    """One entry of `logs_to_process`: the field names are the Spotbot request's."""

    rawbinlog_bin: str
    rawbinlog_time: str
    protocols_xml: str
    output_dir: str


@dataclass(frozen=True)
class Incomplete:
    """A matching log left out because files it needs are missing."""

    rawbinlog_bin: str
    missing: tuple[str, ...]  # the missing files' names

    def describe(self) -> str:
        return f"{self.rawbinlog_bin} (no {', no '.join(self.missing)})"


@dataclass(frozen=True)
class Scan:
    logs: tuple[LogFiles, ...] = ()
    incomplete: tuple[Incomplete, ...] = ()
    unreadable: tuple[str, ...] = ()  # folders the walk could not read

    def params(self) -> dict[str, Any]:
        """The request's params: `{"logs_to_process": [...]}`."""
        return {
            SPLIT_KEY: [
                {
                    "rawbinlog_bin": log.rawbinlog_bin,
                    "rawbinlog_time": log.rawbinlog_time,
                    "protocols_xml": log.protocols_xml,
                    "output_dir": log.output_dir,
                }
                for log in self.logs
            ]
        }


def sibling_names(bin_name: str) -> tuple[str, str]:
    """`rawbinlog.bin` -> (`rawbinlog.time`, `rawbinlog.protocols.xml`)."""
    stem = bin_name.rsplit(".", 1)[0] if "." in bin_name.lstrip(".") else bin_name
    return f"{stem}.time", f"{stem}.protocols.xml"


def plan(listing: Iterable[tuple[PurePath, Collection[str]]], pattern: str) -> Scan:
    """The request for a tree, from its listing: each folder (absolute) with the names
    of the files in it. Logs come sorted by path, so the same tree always makes the same
    request (and the same params hash, for the result cache)."""
    logs: list[tuple[tuple[str, ...], LogFiles]] = []
    incomplete: list[tuple[tuple[str, ...], Incomplete]] = []
    for folder, names in listing:
        present = set(names)
        for name in names:
            if not fnmatch.fnmatchcase(name, pattern):
                continue
            time_name, protocols_name = sibling_names(name)
            bin_path = folder / name
            key = bin_path.parts
            missing = tuple(n for n in (time_name, protocols_name) if n not in present)
            if missing:
                incomplete.append((key, Incomplete(str(bin_path), missing)))
                continue
            entry = LogFiles(
                rawbinlog_bin=str(bin_path),
                rawbinlog_time=str(folder / time_name),
                protocols_xml=str(folder / protocols_name),
                output_dir=str(folder),
            )
            logs.append((key, entry))
    return Scan(
        logs=tuple(e for _, e in sorted(logs, key=lambda item: item[0])),
        incomplete=tuple(e for _, e in sorted(incomplete, key=lambda item: item[0])),
    )


def walk(root: Path) -> tuple[list[tuple[PurePath, list[str]]], list[str]]:
    """Every folder under `root` (absolute, symbolic links not followed) with the names
    of the files in it; and the folders that could not be read."""
    listing: list[tuple[PurePath, list[str]]] = []
    unreadable: list[str] = []

    def failed(exc: OSError) -> None:
        unreadable.append(f"{exc.filename}: {exc.strerror or exc}")

    for folder, _dirs, files in os.walk(root, onerror=failed):
        listing.append((PurePath(folder), files))
    return listing, unreadable


def scan_tree(root: Path | str, pattern: str = DEFAULT_PATTERN) -> Scan:
    """Walk the tree under `root` and plan its request. Paths are absolute, as the user
    sees them (symbolic links in `root` are kept, not resolved: the workers must find
    the files by the same names). Raises NotADirectoryError when `root` is not a
    folder."""
    top = Path(os.path.abspath(root))
    if not top.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    listing, unreadable = walk(top)
    return replace(plan(listing, pattern), unreadable=tuple(sorted(unreadable)))
