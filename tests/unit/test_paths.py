"""Path mapping and path safety: the pure decisions, with hostile inputs."""

from __future__ import annotations

import os
import posixpath
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conveyor.paths import (
    PathError,
    PathRules,
    SelectorError,
    check_params_paths,
    check_path,
    map_path,
    parse_selector,
    request_selectors,
    reverse,
    rewrite_fields,
    rewrite_prefixes,
    task_selectors,
)

RULES = PathRules(
    path_map=(("P:/", "/mnt/p/"), ("V:\\", "/mnt/v/")),
    roots=("/mnt/p", "/mnt/v/incoming"),
    fields=(parse_selector("file"),),
)


def lexical(value: object, rules: PathRules = RULES) -> str:
    return check_path(value, rules, realpath=None)


# ------------------------------------------------------------------ mapping
@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("P:/2022-12/rawbinlog.bin", "/mnt/p/2022-12/rawbinlog.bin"),
        ("p:/2022-12/rawbinlog.bin", "/mnt/p/2022-12/rawbinlog.bin"),  # drive in any case
        ("P:\\2022-12\\A146B#11\\rawbinlog.bin", "/mnt/p/2022-12/A146B#11/rawbinlog.bin"),
        ("P:", "/mnt/p"),
        ("P://a//b", "/mnt/p/a/b"),
        ("v:\\incoming\\x", "/mnt/v/incoming/x"),
        ("/mnt/p/x", "/mnt/p/x"),  # already local
    ],
)
def test_mapping_rewrites_the_longest_prefix(given: str, expected: str) -> None:
    assert map_path(given, RULES.path_map) == expected


def test_a_prefix_matches_whole_components_only() -> None:
    rules = (("/data", "/mnt/data"),)
    assert map_path("/data/x", rules) == "/mnt/data/x"
    assert map_path("/database/x", rules) == "/database/x"


def test_the_longest_rule_wins() -> None:
    rules = (("P:/", "/mnt/p/"), ("P:/fast/", "/ssd/"))
    assert map_path("P:/fast/a", rules) == "/ssd/a"
    assert map_path("P:/slow/a", rules) == "/mnt/p/slow/a"


def test_an_unmapped_drive_is_refused() -> None:
    with pytest.raises(PathError, match="drive Q: is not mapped"):
        map_path("Q:/x", RULES.path_map)


# ---------------------------------------------------------------- the check
@pytest.mark.parametrize(
    "value",
    [
        "P:/a/./b/../b/file.bin",
        "/mnt/p/x/../y",
        "/mnt/v/incoming/deep/er",
        "P:/name with spaces/ünïcode 100%_done.bin",
    ],
)
def test_paths_inside_the_roots_pass_normalised(value: str) -> None:
    out = lexical(value)
    assert out == posixpath.normpath(out)
    assert out.startswith(("/mnt/p/", "/mnt/v/incoming/"))


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("P:/../etc/passwd", "outside the allowed roots"),
        ("P:\\..\\..\\etc\\shadow", "outside the allowed roots"),
        ("/mnt/p/../../etc/passwd", "outside the allowed roots"),
        ("/mnt/p2/x", "outside the allowed roots"),
        ("/mnt/pp", "outside the allowed roots"),
        ("/etc/passwd", "outside the allowed roots"),
        ("/mnt/v/other", "outside the allowed roots"),
        ("V:/incoming/../secret", "outside the allowed roots"),
        ("relative/file", "not an absolute path"),
        ("../mnt/p/x", "not an absolute path"),
        ("P:relative", "not an absolute path"),
        ("Q:/x", "drive Q: is not mapped"),
        ("C:\\Windows\\system32", "drive C: is not mapped"),
        ("\\\\server\\share\\x", "UNC"),
        ("//server/share/x", "UNC"),
        ("\\\\?\\C:\\x", "UNC"),
        ("/mnt/p/a\x00b", "NUL"),
        ("/mnt/p/a\nb", "control character"),
        ("/mnt/p/\x1b[31m", "control character"),
        ("/mnt/p/%2e%2e/%2E%2e/etc", "percent-encoded"),
        ("/mnt/p/..%2fetc", "percent-encoded"),
        ("/mnt/p/..%5cetc", "percent-encoded"),
        ("/mnt/p/x%00", "percent-encoded"),
        ("/mnt/p/\uff0e\uff0e/etc", "looks like"),  # fullwidth full stops
        ("/mnt/p/\u2024\u2024/etc", "looks like"),  # one dot leaders
        ("/mnt/p\uff0fetc", "looks like"),  # fullwidth solidus
        ("/mnt/p/\udcc0\udcae\udcc0\udcae/etc", "surrogate"),  # overlong '..' escaped
        ("", "empty"),
        (7, "must be a string"),
        (None, "must be a string"),
    ],
)
def test_hostile_paths_are_refused(value: object, why: str) -> None:
    with pytest.raises(PathError, match=why):
        lexical(value)


def test_a_symlink_out_of_a_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "ok").mkdir(parents=True)
    outside = tmp_path / "secret"
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    (root / "inner").symlink_to(root / "ok")
    rules = PathRules(roots=(str(root),))
    assert check_path(str(root / "inner" / "f"), rules) == str(root / "inner" / "f")
    with pytest.raises(PathError, match="symbolic link"):
        check_path(str(root / "escape" / "f"), rules)
    with pytest.raises(PathError, match="symbolic link"):
        check_path(str(root / "escape"), rules)


def test_a_root_that_is_itself_a_link_still_holds_its_files(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    rules = PathRules(roots=(str(link),))
    assert check_path(str(link / "f"), rules) == str(link / "f")


def test_a_root_missing_here_is_checked_lexically(tmp_path: Path) -> None:
    rules = PathRules(roots=(str(tmp_path / "not-here"),))
    assert check_path(str(tmp_path / "not-here" / "a"), rules).endswith("/not-here/a")
    with pytest.raises(PathError):
        check_path(str(tmp_path / "not-here" / ".." / "x"), rules)


# ------------------------------------------------------------- params fields
def test_selectors_name_fields_arrays_and_indexes() -> None:
    assert parse_selector("logs_to_process[*].bin") == ("logs_to_process", None, "bin")
    assert parse_selector("$.a[2].b") == ("a", 2, "b")
    assert parse_selector("$.out-dir") == ("out-dir",)
    for bad in ("", "$", "a..b", "a[x]", "[*", ".a b"):
        with pytest.raises(SelectorError):
            parse_selector(bad)


def test_every_declared_path_is_checked_and_the_field_named() -> None:
    rules = PathRules(
        path_map=(("P:/", "/mnt/p/"),),
        roots=("/mnt/p",),
        fields=(parse_selector("logs[*].bin"), parse_selector("out")),
    )
    params = {"logs": [{"bin": "P:/a.bin"}, {"bin": "P:\\b.bin", "n": 1}], "out": "P:/o"}
    mapped = check_params_paths(params, rules, realpath=None)
    assert mapped == {
        "logs": [{"bin": "/mnt/p/a.bin"}, {"bin": "/mnt/p/b.bin", "n": 1}],
        "out": "/mnt/p/o",
    }
    assert params["logs"][0]["bin"] == "P:/a.bin"  # the submitted params are untouched
    hostile = {"logs": [{"bin": "P:/a.bin"}, {"bin": "P:/../../etc/passwd"}], "out": "P:/o"}
    with pytest.raises(PathError) as info:
        check_params_paths(hostile, rules, realpath=None)
    assert info.value.field == "$.logs[1].bin"
    with pytest.raises(PathError) as info:
        check_params_paths({"logs": [], "out": ["P:/x"]}, rules, realpath=None)
    assert info.value.field == "$.out" and "string" in info.value.message


def test_task_selectors_follow_the_split() -> None:
    sels = (parse_selector("logs[*].bin"), parse_selector("out"), parse_selector("files[*]"))
    assert task_selectors(sels, "logs") == (("bin",), ("out",), ("files", None))
    assert task_selectors((parse_selector("files[*]"),), "files") == (("files",), ("item",))
    assert task_selectors(sels, None) == sels


def test_request_selectors_reach_a_field_wherever_a_task_may_take_it_from() -> None:
    sels = (parse_selector("logs[*].bin"), parse_selector("out"))
    assert request_selectors(sels, "logs") == (
        ("logs", None, "bin"),
        ("out",),
        ("bin",),  # a shared `bin` reaches an item that has none
        ("logs", None, "out"),  # an item's `out` wins over the shared one
    )
    assert request_selectors(sels, None) == sels
    # items that are paths themselves: a shared `item` never reaches a task
    files = (parse_selector("files[*]"),)
    assert request_selectors(files, "files") == files
    # a field named `item` in object items is checked wherever it is given
    item = (parse_selector("item"),)
    assert request_selectors(item, "files") == (("item",), ("files", None, "item"))


def test_mapping_back_keeps_roots_as_roots_and_leaves_other_strings_alone() -> None:
    back = reverse((("P:/", "/mnt/p/"),))
    assert rewrite_prefixes(["/mnt/p", "/mnt/p/", "/mnt/pp", "mnt/p"], back) == [
        "P:/",  # the drive's root, not `P:` (its current folder)
        "P:/",
        "/mnt/pp",
        "mnt/p",
    ]
    # a rule on the root maps absolute paths only, not every string
    root = reverse((("P:/", "/"),))
    assert rewrite_prefixes(["/", "/x/y", "hello", "2022"], root) == [
        "P:/",
        "P:/x/y",
        "hello",
        "2022",
    ]
    assert map_path("P:/", (("P:/", "/"),)) == "/"
    assert map_path("p:\\a", (("P:/", "/"),)) == "/a"


def test_results_are_mapped_back_and_hosts_remap_fields() -> None:
    back = reverse((("P:/", "/mnt/p/"),))
    result = {"db": "/mnt/p/out/spotbot.db", "n": 3, "other": "/tmp/x", "l": ["/mnt/p"]}
    assert rewrite_prefixes(result, back) == {
        "db": "P:/out/spotbot.db",
        "n": 3,
        "other": "/tmp/x",
        "l": ["P:/"],
    }
    params = {"bin": "/mnt/p/a.bin", "note": "/mnt/p/a.bin"}
    host = (("/mnt/p/", "/data/p/"),)
    assert rewrite_fields(params, (("bin",),), host) == {
        "bin": "/data/p/a.bin",
        "note": "/mnt/p/a.bin",
    }


# ---------------------------------------------------------------- properties
SEGMENT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), min_codepoint=1), max_size=8)
HOSTILE_SEGMENT = st.one_of(
    SEGMENT, st.sampled_from(["..", ".", "", "%2e%2e", "\\..", "..\\..", "~", "//"])
)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(["P:/", "p:\\", "/mnt/p/", "/mnt/v/incoming/", "/", "V:/", ""]),
    st.lists(HOSTILE_SEGMENT, max_size=8),
    st.sampled_from(["/", "\\"]),
)
def test_whatever_passes_is_normalised_and_inside_a_root(
    start: str, parts: list[str], sep: str
) -> None:
    value = start + sep.join(parts)
    try:
        out = lexical(value)
    except PathError:
        return
    assert out == posixpath.normpath(out) and out.startswith("/")
    assert "\x00" not in out and "\\" not in out
    assert ".." not in out.split("/")
    assert any(out == r or out.startswith(r + "/") for r in RULES.roots)
    # deciding again on the result changes nothing
    assert lexical(out) == out


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_any_text_is_either_refused_or_confined(value: str) -> None:
    try:
        out = lexical(value)
    except PathError:
        return
    assert any(out == r or out.startswith(r + "/") for r in RULES.roots)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.text(alphabet="abcXYZ019 _-#.é", min_size=1, max_size=6).filter(
            lambda s: s not in (".", "..")
        ),
        min_size=1,
        max_size=5,
    )
)
def test_a_plain_path_under_a_drive_maps_and_maps_back(parts: list[str]) -> None:
    value = "P:/" + "/".join(parts)
    out = lexical(value)
    assert out == "/mnt/p/" + "/".join(parts)
    assert rewrite_prefixes(out, reverse(RULES.path_map)) == value


def test_realpath_is_used_when_the_root_exists(tmp_path: Path) -> None:
    calls: list[str] = []

    def spy(p: str) -> str:
        calls.append(p)
        return os.path.realpath(p)

    check_path(str(tmp_path / "a"), PathRules(roots=(str(tmp_path),)), realpath=spy)
    assert calls
