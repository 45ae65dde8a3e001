"""The ingester's worker processes: chunks prepared in order per worker, a worker that
dies replaced with only its own files given back, a stage that raises leaving the
worker alive, and every worker gone after close."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conveyor.ingest.prepare import Chunk, Outcome, Plan, Stages
from conveyor.ingest.samples import split_document
from conveyor.ingest.sinks.kcidb import kcidb_specs
from conveyor.ingest.workers import Failed, WorkerPool
from ingest_support import put, sample
from proc_support import alive


def _plan(spool: Path) -> Plan:
    return Plan(spool_dir=str(spool), sink_name="kcidb", sink_type="kcidb", tables=kcidb_specs())


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    folder = tmp_path / "spool"
    for i, part in enumerate(split_document(sample("cki-v5.json"), 8)):
        put(folder, f"p{i}.json", part)
    return folder


@pytest.fixture
def pools() -> Iterator[list[WorkerPool]]:
    made: list[WorkerPool] = []
    yield made
    for pool in made:
        pool.close()


def _collect(pool: WorkerPool, seconds: float = 30) -> list[tuple[list[str], Any]]:
    out: list[tuple[list[str], Any]] = []
    deadline = time.monotonic() + seconds
    while pool.in_flight and time.monotonic() < deadline:
        out.extend(pool.results(timeout=0.5))
    assert not pool.in_flight, "the workers did not answer"
    return out


def _opened_by_reader(fifo: Path, seconds: float = 30) -> int:
    """The FIFO's write end, once a reader has it open (a worker reading it): opening
    it for writing without blocking fails until then."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def test_chunks_come_back_prepared_and_close_stops_every_worker(
    spool: Path, pools: list[WorkerPool]
) -> None:
    pool = WorkerPool(_plan(spool), workers=2, per_worker=2)
    pools.append(pool)
    assert pool.capacity == 4
    pool.send(["p0.json", "p1.json"])
    pool.send(["p2.json"])
    pool.send(["missing.json"])
    assert pool.in_flight == 3 and pool.capacity == 1
    results = dict((tuple(names), r) for names, r in _collect(pool))
    both = results[("p0.json", "p1.json")]
    assert isinstance(both, Chunk) and [n for n, _ in both.files] == ["p0.json", "p1.json"]
    assert both.count == sum(rows for _, rows in both.files) > 0
    assert set(both.rows) <= {
        f"kcidb_{t}" for t in ("checkouts", "builds", "tests", "issues", "incidents")
    }
    gone = results[("missing.json",)]
    assert isinstance(gone, Chunk) and [p.outcome for p in gone.others] == [Outcome.RETRY]
    pids = pool.pids
    assert len(pids) == 2 and all(alive(pid) for pid in pids)
    pool.close()
    assert not any(alive(pid) for pid in pids)


def test_a_killed_worker_gives_back_its_files_and_is_replaced(
    spool: Path, pools: list[WorkerPool]
) -> None:
    os.mkfifo(spool / "stuck.json")  # reading it blocks: the worker is mid-chunk
    pool = WorkerPool(_plan(spool), workers=1, per_worker=2)
    pools.append(pool)
    pool.send(["p2.json"])
    assert isinstance(_collect(pool)[0][1], Chunk)  # the worker is up
    pool.send(["stuck.json", "p3.json"])
    pool.send(["p4.json"])
    (victim,) = pool.pids
    writer = _opened_by_reader(spool / "stuck.json")
    try:
        os.kill(victim, signal.SIGKILL)
        results = _collect(pool)
    finally:
        os.close(writer)
    assert [names for names, _ in results] == [["stuck.json", "p3.json"], ["p4.json"]]
    (_, on), (_, behind) = results
    assert isinstance(on, Failed) and isinstance(behind, Failed)
    assert f"worker process {victim} exited with code -9" in on.reason
    # the chunk it was on is the suspect; the one queued behind it is not
    assert on.culprit and on.ready and not behind.culprit and behind.ready
    # a new worker took its place, and prepares what it is sent
    (other,) = pool.pids
    assert other != victim and alive(other)
    pool.send(["p4.json"])
    ((_, again),) = _collect(pool)
    assert isinstance(again, Chunk) and [n for n, _ in again.files] == ["p4.json"]


def test_a_stage_that_raises_fails_its_chunk_and_the_worker_lives_on(
    spool: Path, pools: list[WorkerPool], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Stages.run

    def run(self: Stages, name: str) -> Any:
        if name == "boom.json":
            raise RuntimeError("a bug in a stage")
        return real(self, name)

    monkeypatch.setattr(Stages, "run", run)
    pool = WorkerPool(_plan(spool), workers=1, start="fork")  # forked: it has the patch
    pools.append(pool)
    (pid,) = pool.pids
    pool.send(["p5.json", "boom.json"])
    pool.send(["p6.json"])
    (first, firsts), (second, seconds) = _collect(pool)
    assert first == ["p5.json", "boom.json"] and isinstance(firsts, Failed)
    assert "RuntimeError: a bug in a stage" in firsts.reason
    assert second == ["p6.json"] and isinstance(seconds, Chunk) and seconds.count > 0
    assert pool.pids == [pid]  # the same worker


def _children() -> list[int]:
    """This process's live worker processes, started afresh (`spawn`) as the ingester
    runs beside another thread here (not multiprocessing's resource tracker, nor a
    process forked and not yet started)."""
    me = str(os.getpid())
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if fields[1] == me and fields[0] != "Z" and b"spawn_main" in cmdline:
                found.append(int(entry))
    return found


def test_the_ingester_replaces_a_dead_worker_and_ingests_what_it_was_sent(
    make_app: Any, db_url: str, spool: Path, tmp_path: Path
) -> None:
    """The ingester as a service: its worker process is killed while idle; the ingester
    finds it dead when it has files to send, another worker takes its place, and every
    file is ingested."""
    from ingest_support import counts, names, spool_config

    later = tmp_path / "later"
    spool.rename(later)
    spool.mkdir()
    ingester = make_app().ingester(spool_config(spool, workers=1, interval=0.05))
    running = threading.Thread(target=ingester.run, daemon=True)
    running.start()
    try:
        deadline = time.monotonic() + 30
        while not _children() and time.monotonic() < deadline:
            time.sleep(0.05)
        (victim,) = _children()
        os.kill(victim, signal.SIGKILL)
        for path in sorted(later.iterdir()):
            path.rename(spool / path.name)
        deadline = time.monotonic() + 60
        while len(names(spool / "archive")) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        (replacement,) = _children()
        assert replacement != victim
    finally:
        ingester.stop()
        running.join(30)
        ingester.writer.close()
    assert names(spool / "archive") == [f"p{i}.json" for i in range(8)]
    assert names(spool / "failed") == []
    assert counts(db_url)["tests"] == 3387
    assert not _children()  # the replacement stopped with the ingester


def test_a_file_whose_preparing_keeps_failing_goes_alone_then_to_failed(
    make_app: Any, spool: Path
) -> None:
    """What the ingester does with chunks its worker could not prepare: the files of
    the one it died on are tried again each alone, and one that fails so three times
    fails at the `prepare` stage with the last reason; files that only waited behind it
    get no strike; when workers cannot even start, the files wait an interval."""
    from conveyor.ingest.spool import Stage
    from ingest_support import spool_config

    ingester = make_app().ingester(spool_config(spool, interval=60))
    try:
        died = "worker process 41 exited with code -9"
        assert ingester._chunk(["a.json", "b.json"], Failed(died)).others == ()
        assert ingester._chunk(["q.json"], Failed(died, culprit=False)).others == ()
        # the suspects are tried again alone (and the files before them together)
        assert ingester._take(["a.json", "b.json", "c.json"], 3) == 1
        assert ingester._take(["c.json", "d.json", "a.json"], 3) == 2
        assert ingester._take(["q.json", "d.json"], 2) == 2  # it only waited
        assert not ingester._deferred  # all of them are taken again at once
        # b was fine after all: it no longer goes alone
        ingester._chunk(["b.json"], Chunk(files=(("b.json", 1),), count=1))
        assert ingester._take(["b.json", "c.json"], 2) == 2
        ingester._chunk(["a.json"], Failed(died))
        bug = Failed("Traceback (most recent call last):\n  ...\nRuntimeError: a bug\n")
        (last,) = ingester._chunk(["a.json"], bug).others
        assert last.outcome is Outcome.FAILED and last.error is not None
        assert last.error.stage is Stage.PREPARE
        assert (
            last.error.reason == "preparing it failed 3 times; the last time: RuntimeError: a bug"
        )
        assert ingester._take(["a.json", "c.json"], 2) == 2  # forgotten once failed
        # workers that die before they are ready: nobody's fault, the files wait
        assert ingester._chunk(["z.json"], Failed(died, culprit=False, ready=False)).others == ()
        assert set(ingester._deferred) == {"z.json"}
        assert ingester._take(["z.json", "c.json"], 2) == 2
    finally:
        ingester.writer.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_once_a_file_that_kills_its_worker_fails_and_the_rest_is_ingested(
    make_app: Any,
    db_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    workers: int,
) -> None:
    """`conveyor ingest --once` on a spool where one file kills the worker preparing
    it, every time: that file alone ends in failed/ (stage `prepare`), and every file
    sent with it or queued behind it is ingested, in the same run."""
    import functools

    import conveyor.ingest.pipeline as pipeline
    from ingest_support import counts, names, spool_config

    real = Stages.run

    def run(self: Stages, name: str) -> Any:
        if name == "m-poison.json":
            os._exit(7)
        return real(self, name)

    monkeypatch.setattr(Stages, "run", run)
    # forked, replacements too: they have the patch
    monkeypatch.setattr(pipeline, "WorkerPool", functools.partial(WorkerPool, start="fork"))
    spool = tmp_path / "spool"
    parts = split_document(sample("cki-v5.json"), 60)
    for i, part in enumerate(parts):
        put(spool, f"{'a' if i < 30 else 'z'}-{i:02d}.json", part)
    put(spool, "m-poison.json", parts[0])
    ingester = make_app().ingester(spool_config(spool, workers=workers))
    try:
        stats = ingester.run(once=True)
    finally:
        ingester.writer.close()
    assert names(spool / "failed") == ["m-poison.error.json", "m-poison.json"]
    error = json.loads((spool / "failed" / "m-poison.error.json").read_text())
    assert error["stage"] == "prepare" and "failed 3 times" in error["reason"]
    assert "exited with code 7" in error["reason"]
    assert len(names(spool / "archive")) == len(parts) and names(spool) == []
    assert stats.failed == {"prepare": 1} and stats.files == len(parts)
    assert counts(db_url)["tests"] == 3387


def test_a_worker_that_takes_too_long_is_killed_and_replaced(
    spool: Path, pools: list[WorkerPool]
) -> None:
    """A stage that hangs (here: reading a FIFO nobody writes) holds its worker only
    for the time allowed per file: the worker is killed, the chunk comes back as the
    suspect with the reason, and another worker takes its place."""
    os.mkfifo(spool / "hung.json")
    pool = WorkerPool(_plan(spool), workers=1, timeout=2.0)
    pools.append(pool)
    (victim,) = pool.pids
    pool.send(["p2.json"])
    assert isinstance(_collect(pool)[0][1], Chunk)  # the worker is up
    started = time.monotonic()
    pool.send(["hung.json"])
    pool.send(["p1.json"])
    (_, hung), (_, behind) = _collect(pool)
    assert 2.0 <= time.monotonic() - started < 20
    assert isinstance(hung, Failed) and hung.culprit
    assert hung.reason == f"worker process {victim} killed: preparing a file took longer than 2s"
    assert isinstance(behind, Failed) and not behind.culprit
    (other,) = pool.pids
    assert other != victim and alive(other) and not alive(victim)


def test_results_read_late_are_not_taken_for_a_hung_worker(
    spool: Path, pools: list[WorkerPool]
) -> None:
    """Results that wait in the pipe while the ingester is busy elsewhere (its writer
    behind, say) are taken as they are: the worker that sent them is not overdue."""
    pool = WorkerPool(_plan(spool), workers=1, timeout=0.3)
    pools.append(pool)
    (pid,) = pool.pids
    pool.send(["p1.json"])
    pool.send(["p2.json"])
    time.sleep(1.5)  # both chunks are long done, and their time long past
    results = _collect(pool)
    assert [names for names, _ in results] == [["p1.json"], ["p2.json"]]
    assert all(isinstance(r, Chunk) and r.count > 0 for _, r in results)
    time.sleep(0.2)
    assert pool.pids == [pid] and alive(pid)  # not killed


def test_an_unknown_start_method_is_refused(spool: Path) -> None:
    with pytest.raises(ValueError, match="start: expected 'fork' or 'spawn', got 'forkserver'"):
        WorkerPool(_plan(spool), workers=1, start="forkserver")
