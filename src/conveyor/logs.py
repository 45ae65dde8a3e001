"""Reading an attempt's log, wherever it is kept: its file (`LocalArtifacts`), or for a
quiet attempt (a command that printed nothing) the database, which keeps its two lines
with its outcome (`Outcome.log`)."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

CHUNK = 64 * 1024


def tail_offset(path: Path, lines: int) -> int:
    """Where the last `lines` lines of a file begin (a last line without a newline
    counts)."""
    with path.open("rb") as f:
        return _tail_start(f, lines)


def start_offset(path: Path, tail: int | None) -> int:
    """Where reading a log file begins: its start, or its last `tail` lines (a file
    that has gone, pruned say, reads as empty)."""
    if tail is None:
        return 0
    try:
        return tail_offset(path, tail)
    except FileNotFoundError:
        return 0


def last_lines(data: bytes, lines: int) -> bytes:
    """The last `lines` lines of `data`, counted as `tail_offset` counts them."""
    return data[_tail_start(io.BytesIO(data), lines) :]


def _tail_start(f: BinaryIO, lines: int) -> int:
    """Where the last `lines` lines of a seekable binary file begin, read back from its
    end a chunk at a time."""
    end = f.seek(0, os.SEEK_END)
    if lines <= 0:
        return end
    pos = end
    found = 0
    skip_last = True  # a newline ending the file ends the last line, it does not start one
    while pos > 0:
        step = min(CHUNK, pos)
        pos -= step
        f.seek(pos)
        block = f.read(step)
        i = len(block)
        while True:
            i = block.rfind(b"\n", 0, i)
            if i < 0:
                break
            if skip_last and pos + i == end - 1:
                skip_last = False
                continue
            skip_last = False
            found += 1
            if found == lines:
                return pos + i + 1
    return 0


@dataclass(frozen=True)
class AttemptLog:
    """One attempt's log: its file, or the text the database keeps (`kept`). Where an
    attempt has both (a quiet run of it, then another under the same number that
    printed), the log is the kept text, then the file."""

    attempt: int
    path: Path
    kept: bytes | None = None

    def read(self, tail: int | None = None, most: int = -1) -> bytes:
        """The log, or its last `tail` lines; at most `most` bytes of it (-1: all).
        Empty for a file that has gone meanwhile (retention)."""
        if self.kept is not None:
            data = self.kept
            try:
                data += self.path.read_bytes()
            except FileNotFoundError:
                pass
            if tail is not None:
                data = last_lines(data, tail)
            return data if most < 0 else data[:most]
        try:
            with self.path.open("rb") as f:
                f.seek(start_offset(self.path, tail))
                return f.read(most)
        except FileNotFoundError:
            return b""
