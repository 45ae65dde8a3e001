"""Where attempts' logs and work directories live, and finding the logs again: the
flat per-request layout, and logs kept in the per-task layout of earlier versions."""

from __future__ import annotations

from pathlib import Path

from conveyor.artifacts import LocalArtifacts


def test_one_folder_per_request_and_the_attempts_found_both_ways(tmp_path: Path) -> None:
    arts = LocalArtifacts(tmp_path)
    log, work = arts.attempt_paths(7, 42, 2)
    assert log == f"{tmp_path}/logs/7/42.attempt-2.log"
    assert work == f"{tmp_path}/work/7/42"
    folder = tmp_path / "logs" / "7"
    folder.mkdir(parents=True)
    for name in ("42.attempt-1.log", "42.attempt-3.log", "420.attempt-1.log", "4.attempt-2.log"):
        (folder / name).write_text("x\n")
    assert arts.attempts_logged(7, 42) == [1, 3]  # not task 420's, nor task 4's
    assert arts.attempts_logged(7, 42, upto=3) == [1, 3]
    assert arts.attempts_logged(7, 42, upto=2) == [1, 3]  # a released attempt comes again
    assert arts.attempts_logged(7, 42, upto=1) == [1]
    assert arts.attempts_logged(7, 5) == []
    assert arts.attempts_logged(8, 42) == []
    assert arts.log_path(7, 42, 3) == folder / "42.attempt-3.log"


def test_logs_of_the_per_task_layout_are_still_found(tmp_path: Path) -> None:
    arts = LocalArtifacts(tmp_path)
    old = tmp_path / "logs" / "7" / "42"
    old.mkdir(parents=True)
    (old / "attempt-1.log").write_text("kept\n")
    assert arts.attempts_logged(7, 42) == [1]
    assert arts.attempts_logged(7, 42, upto=1) == [1]
    assert arts.log_path(7, 42, 1).read_text() == "kept\n"
    # a new attempt goes to the new layout, and both are listed
    Path(arts.attempt_paths(7, 42, 2)[0]).write_text("new\n")
    assert arts.attempts_logged(7, 42, upto=2) == [1, 2]
