"""Reading an attempt's log: its last lines, from a file or from the text the database
keeps for a quiet attempt, counted the same way."""

from __future__ import annotations

from pathlib import Path

import pytest

from conveyor.logs import AttemptLog, last_lines, tail_offset

SAMPLES = [
    b"",
    b"\n",
    b"\n\n",
    b"one",
    b"one\n",
    b"one\ntwo",
    b"one\ntwo\n",
    b"one\n\nthree\n",
    b"$ true\nexit code 0\n",
    b"no newline\r\nat the end\rhere",
]


@pytest.mark.parametrize("data", SAMPLES)
def test_last_lines_of_text_match_the_tail_of_a_file(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "log"
    path.write_bytes(data)
    for lines in range(-1, 6):
        from_file = data[tail_offset(path, lines) :]
        assert last_lines(data, lines) == from_file, (data, lines)
        assert AttemptLog(1, path).read(lines) == from_file
        assert AttemptLog(1, tmp_path / "none", kept=data).read(lines) == from_file


def test_last_lines_examples() -> None:
    assert last_lines(b"$ true\nexit code 0\n", 1) == b"exit code 0\n"
    assert last_lines(b"a\nb\nc", 2) == b"b\nc"
    assert last_lines(b"a\nb\n", 0) == b""
    assert last_lines(b"a\nb\n", 9) == b"a\nb\n"


def test_an_attempt_log_reads_its_kept_text_before_any_file(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_bytes(b"from the file\n")
    assert AttemptLog(1, path).read() == b"from the file\n"
    # an attempt run again under its number, quiet first, then printing: both, in order
    assert AttemptLog(1, path, kept=b"kept\n").read() == b"kept\nfrom the file\n"
    assert AttemptLog(1, path, kept=b"kept\n").read(1) == b"from the file\n"
    assert AttemptLog(1, tmp_path / "none", kept=b"kept\n").read() == b"kept\n"
    assert AttemptLog(1, tmp_path / "none", kept=b"0123456789").read(most=4) == b"0123"
    assert AttemptLog(1, path).read(most=4) == b"from"
    assert AttemptLog(1, tmp_path / "gone").read() == b""  # pruned meanwhile
    assert AttemptLog(1, tmp_path / "gone").read(3) == b""
