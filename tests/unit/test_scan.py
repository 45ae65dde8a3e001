"""Scanning a field-test tree: which logs make the request, in which order, and what
happens to a log missing a file."""

from __future__ import annotations

import json
import random
from pathlib import Path, PurePath

import pytest

from conveyor.examples.spotbot import make_field_test_tree
from conveyor.scan import DEFAULT_PATTERN, Incomplete, LogFiles, plan, scan_tree, sibling_names

LOG = ["rawbinlog.bin", "rawbinlog.time", "rawbinlog.protocols.xml"]
DAY = PurePath("/V/2022-12-13/G2/20221213_Driving")


def gps(device: str) -> PurePath:
    return DAY / device / "gps"


def test_each_log_becomes_one_entry_of_logs_to_process() -> None:
    scan = plan([(gps("A146B#11"), LOG), (gps("A146B#12"), [*LOG, "notes.txt"])], DEFAULT_PATTERN)
    assert scan.incomplete == ()
    assert scan.params() == {
        "logs_to_process": [
            {
                "rawbinlog_bin": f"{gps(d)}/rawbinlog.bin",
                "rawbinlog_time": f"{gps(d)}/rawbinlog.time",
                "protocols_xml": f"{gps(d)}/rawbinlog.protocols.xml",
                "output_dir": str(gps(d)),
            }
            for d in ("A146B#11", "A146B#12")
        ]
    }


def test_the_request_is_the_same_whatever_order_the_tree_is_listed_in() -> None:
    listing = [(gps(f"A146B#{n}"), list(LOG)) for n in range(1, 30)]
    listing.append((DAY, ["readme.md"]))
    expected = plan(listing, DEFAULT_PATTERN)
    paths = [log.rawbinlog_bin for log in expected.logs]
    assert paths == sorted(paths, key=lambda p: PurePath(p).parts)
    rnd = random.Random(7)
    for _ in range(5):
        shuffled = [(folder, rnd.sample(names, len(names))) for folder, names in listing]
        rnd.shuffle(shuffled)
        assert plan(shuffled, DEFAULT_PATTERN) == expected
    assert json.dumps(expected.params()) == json.dumps(plan(listing, DEFAULT_PATTERN).params())


def test_a_log_missing_a_sibling_is_left_out_and_reported() -> None:
    scan = plan(
        [
            (gps("A146B#1"), LOG),
            (gps("A146B#2"), ["rawbinlog.bin", "rawbinlog.protocols.xml"]),
            (gps("A146B#3"), ["rawbinlog.bin"]),
        ],
        DEFAULT_PATTERN,
    )
    assert [log.output_dir for log in scan.logs] == [str(gps("A146B#1"))]
    assert scan.incomplete == (
        Incomplete(f"{gps('A146B#2')}/rawbinlog.bin", ("rawbinlog.time",)),
        Incomplete(
            f"{gps('A146B#3')}/rawbinlog.bin", ("rawbinlog.time", "rawbinlog.protocols.xml")
        ),
    )
    assert (
        scan.incomplete[1]
        .describe()
        .endswith("A146B#3/gps/rawbinlog.bin (no rawbinlog.time, no rawbinlog.protocols.xml)")
    )
    # siblings elsewhere do not count: they must sit beside the log
    assert plan([(gps("x"), ["rawbinlog.bin"]), (DAY, LOG[1:])], DEFAULT_PATTERN).logs == ()


def test_the_pattern_picks_the_logs_and_siblings_follow_their_name() -> None:
    folder = PurePath("/data/run")
    names = ["a.b.bin", "a.b.time", "a.b.protocols.xml", "c.bin", "rawbinlog.bin.bak"]
    scan = plan([(folder, names)], "*.bin")
    assert scan.logs == (
        LogFiles(
            "/data/run/a.b.bin", "/data/run/a.b.time", "/data/run/a.b.protocols.xml", "/data/run"
        ),
    )
    assert [i.rawbinlog_bin for i in scan.incomplete] == ["/data/run/c.bin"]
    # names are matched as they are spelled
    assert plan([(folder, ["RawBinLog.bin", *LOG[1:]])], DEFAULT_PATTERN).logs == ()
    assert sibling_names("rawbinlog.bin") == ("rawbinlog.time", "rawbinlog.protocols.xml")
    assert sibling_names("log") == ("log.time", "log.protocols.xml")
    assert sibling_names(".bin") == (".bin.time", ".bin.protocols.xml")


def test_scanning_a_generated_field_test_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bins = make_field_test_tree(tmp_path / "V", devices=3, records=5)
    (bins[1].parent / "rawbinlog.time").unlink()
    scan = scan_tree(tmp_path / "V")
    assert [log.rawbinlog_bin for log in scan.logs] == [str(bins[0]), str(bins[2])]
    assert scan.logs[0].output_dir == str(bins[0].parent)
    assert scan.incomplete == (Incomplete(str(bins[1]), ("rawbinlog.time",)),)
    assert scan.unreadable == ()
    # a relative root gives absolute paths
    monkeypatch.chdir(tmp_path / "V")
    assert scan_tree(Path("..") / "V").logs == scan.logs
    with pytest.raises(NotADirectoryError, match="not a folder"):
        scan_tree(tmp_path / "nowhere")
    with pytest.raises(NotADirectoryError):
        scan_tree(bins[0])
