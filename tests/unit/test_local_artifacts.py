"""Where attempts' logs and work directories live, and finding the logs again: the
flat per-request layout, and logs kept in the per-task layout of earlier versions; the
placement mark on `logs` and `work`."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from conveyor.artifacts import LocalArtifacts, spread_subfolders
from fs_support import EXTENTS_FL, TOPDIR_FL, folder_flags


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


def test_prepare_marks_logs_and_work_as_tops_of_unrelated_folders(tmp_path: Path) -> None:
    arts = LocalArtifacts(tmp_path / "artifacts")
    arts.prepare()
    arts.prepare()  # again, as each worker process does: nothing changes
    for kind in ("logs", "work"):
        folder = tmp_path / "artifacts" / kind
        assert folder.is_dir()
        flags = folder_flags(folder)
        if flags is not None and flags & EXTENTS_FL:  # ext4, as this machine's /tmp
            assert flags & TOPDIR_FL
        else:  # elsewhere the mark is not known, and no error is raised
            assert not spread_subfolders(str(folder))


def test_a_folder_reached_through_a_link_is_not_marked(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert not spread_subfolders(str(tmp_path / "link"))
    flags = folder_flags(tmp_path / "real")
    assert flags is None or not flags & TOPDIR_FL


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm (tmpfs)")
def test_prepare_on_a_file_system_without_the_mark_still_makes_the_folders() -> None:
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:  # tmpfs
        arts = LocalArtifacts(Path(shm))
        arts.prepare()
        assert (Path(shm) / "logs").is_dir() and (Path(shm) / "work").is_dir()
        assert not spread_subfolders(f"{shm}/logs")
