"""`conveyor bench-exec`, small: both sides run the same tasks, the figures add up, and
the rounds' files go where `--scratch` says and are gone afterwards."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest

from conveyor.app import Conveyor
from conveyor.artifacts import LocalArtifacts
from conveyor.bench_exec import (
    ExecBenchOptions,
    _number_requests_from,
    balanced_orders,
    bare_loop_with_files,
    conveyor_run,
    first_request_id,
)
from conveyor.cli import main
from conveyor.config import parse_config


def test_bench_exec_reports_both_sides_and_cleans_its_scratch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with pytest.raises(SystemExit) as exc:
        main(["bench-exec", "--tasks", "20", "--rounds", "2", "--scratch", str(scratch), "--json"])
    assert exc.value.code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["scratch"] == str(scratch)
    assert result["tasks"] == 20
    assert len(result["bare_seconds"]) == len(result["conveyor_seconds"]) == 2
    assert all(t > 0 for t in result["bare_seconds"] + result["conveyor_seconds"])
    # the ratio is of the medians before they were rounded to 1 ms
    bare, conveyor = result["bare_median_s"], result["conveyor_median_s"]
    assert (conveyor - 5e-4) / (bare + 5e-4) <= result["ratio"] <= (conveyor + 5e-4) / (bare - 5e-4)
    # the third side, the bare loop with an attempt's files, ran as many rounds
    files = result["bare_with_files_median_s"]
    assert len(result["bare_with_files_seconds"]) == 2
    assert all(t > 0 for t in result["bare_with_files_seconds"])
    assert (files - 5e-4) / (bare + 5e-4) <= result["files_ratio"] <= (files + 5e-4) / (bare - 5e-4)
    low, high = (conveyor - 5e-4) / (files + 5e-4), (conveyor + 5e-4) / (files - 5e-4)
    assert low <= result["ratio_to_bare_with_files"] <= high
    # the fourth side, Conveyor with the pipeline's work_dir = false
    unplaced = result["no_work_dir_median_s"]
    assert len(result["no_work_dir_seconds"]) == 2
    low, high = (unplaced - 5e-4) / (bare + 5e-4), (unplaced + 5e-4) / (bare - 5e-4)
    assert low <= result["no_work_dir_ratio"] <= high
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize("n", [2, 4, 6])
def test_the_sides_take_turns_in_each_place_and_after_each_other_alike(n: int) -> None:
    orders = balanced_orders(n)
    assert len(orders) == n
    for order in orders:
        assert sorted(order) == list(range(n))
    for place in range(n):
        assert sorted(order[place] for order in orders) == list(range(n))
    follows = [(a, b) for order in orders for a, b in itertools.pairwise(order)]
    assert sorted(follows) == [(a, b) for a in range(n) for b in range(n) if a != b]
    with pytest.raises(ValueError, match="even"):
        balanced_orders(n + 1)


def test_a_round_without_work_directories_makes_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Path] = []
    real = Conveyor.close

    def keep_root(app: Conveyor) -> None:
        seen.append(app.artifacts.root)
        real(app)

    monkeypatch.setattr(Conveyor, "close", keep_root)
    opts = ExecBenchOptions(tasks=12, concurrency=4)
    assert conveyor_run(opts, tmp_path, work_dir=False) > 0
    assert conveyor_run(opts, tmp_path) > 0
    unplaced, placed = seen
    assert not any((unplaced / "work").iterdir())
    made = [d for r in (placed / "work").iterdir() for d in r.iterdir()]
    assert len(made) == opts.tasks + opts.concurrency * 2  # the round's and the warm-up's


def test_bench_exec_refuses_a_scratch_that_does_not_exist(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a short name: the error's box would wrap a long one
    with pytest.raises(SystemExit) as exc:
        main(["bench-exec", "--scratch", "nowhere"])
    assert exc.value.code == 2
    assert "nowhere" in capsys.readouterr().err


def test_bench_exec_with_worker_processes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["bench-exec", "--tasks", "20", "--rounds", "1", "--scratch", str(tmp_path)]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--processes", "2", "--concurrency", "4", "--json"])
    assert exc.value.code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["processes"] == 2 and result["concurrency"] == 4
    assert result["conveyor_seconds"][0] > 0
    with pytest.raises(SystemExit) as exc:
        main([*args, "--processes", "3", "--concurrency", "4"])
    assert exc.value.code != 0
    assert "cannot be shared evenly" in capsys.readouterr().err


def test_the_bare_loop_with_files_gives_each_process_a_work_dir_and_a_log_if_it_prints(
    tmp_path: Path,
) -> None:
    opts = ExecBenchOptions(tasks=6, concurrency=3, command=("sh", "-c", "pwd; echo out >&2"))
    assert bare_loop_with_files(opts, tmp_path, 1234) > 0
    files = LocalArtifacts(tmp_path)
    for n in range(6):
        log, work = files.attempt_paths(1234, n, 1)  # where a worker keeps task n's
        real = os.path.realpath(work)  # as pwd shows it
        assert Path(log).read_text() == f"$ sh -c pwd; echo out >&2\n{real}\nout\nexit code 0\n"
    assert sorted(p.name for p in (tmp_path / "work" / "1234").iterdir()) == [
        str(n) for n in range(6)
    ]
    # a command that prints nothing has no log file, as in a worker (its log is kept in
    # the database)
    quiet = ExecBenchOptions(tasks=3, concurrency=3, command=("true",))
    assert bare_loop_with_files(quiet, tmp_path, 99) > 0
    assert not (tmp_path / "logs" / "99").exists()
    assert len(list((tmp_path / "work" / "99").iterdir())) == 3


def test_a_rounds_requests_are_numbered_from_the_point_given(tmp_path: Path) -> None:
    app = Conveyor(
        parse_config(
            {"pipelines": {"true": {"executor": "command", "command": ["true"]}}},
            tmp_path,
            {"CONVEYOR_DATABASE_URL": f"sqlite:///{tmp_path / 'c.db'}"},
        )
    )
    try:
        app.store.upgrade()
        first = first_request_id()
        _number_requests_from(tmp_path / "c.db", first)
        assert app.submit("true", {}).request.id == first
        assert app.submit("true", {}).request.id == first + 1
    finally:
        app.close()
