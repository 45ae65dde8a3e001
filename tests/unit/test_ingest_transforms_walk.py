"""The transforms' walk keeps no paths (it is on every file's way): its results and the
JSON path of its errors are checked against the plain recursive walk that tracks the
path at every step, on every part of the real KCIDB samples."""

from __future__ import annotations

import copy
import re
from typing import Any
from urllib.parse import quote, urljoin

import pytest

from conveyor.ingest.samples import split_document
from conveyor.ingest.transforms import (
    RelativeUrls,
    TransformError,
    Transforms,
    apply_before,
    path_to,
    rewrite_url,
)
from conveyor.pipelines import json_path
from ingest_support import V1_TRANSFORMS, sample


def reference(doc: Any, t: Transforms) -> Any:
    """The obvious walk: recursive, in document order, the path kept at every step."""

    def fill(template: str, node: dict[str, Any], path: list[Any]) -> str:
        def value(m: re.Match[str]) -> str:
            found: Any = node
            for part in m.group(1).split("."):
                found = found.get(part) if isinstance(found, dict) else None
            if found is None or isinstance(found, dict | list):
                raise TransformError(
                    json_path(path),
                    f"url_base needs {m.group(1)!r}, which this object does not have",
                )
            return quote(str(found), safe="/")

        return re.sub(r"\{([A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*)\}", value, template)

    def walk(node: Any, path: list[Any]) -> None:
        if isinstance(node, dict):
            for key in list(node):
                value = node[key]
                if isinstance(value, str):
                    if key == "url" or key.endswith("_url"):
                        value = node[key] = rewrite_url(value, t)
                        if not value or re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", value):
                            continue
                        if t.relative_urls is RelativeUrls.RESOLVE and t.url_base:
                            node[key] = urljoin(fill(t.url_base, node, [*path, key]), value)
                        elif t.relative_urls is RelativeUrls.DROP:
                            del node[key]
                        elif t.relative_urls is RelativeUrls.RESOLVE:
                            raise TransformError(
                                json_path([*path, key]),
                                f"relative URL {value!r} and no url_base to resolve it",
                            )
                    elif key == "origin" and value in t.origins:
                        node[key] = t.origins[value]
                else:
                    walk(value, [*path, key])
        elif isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, [*path, i])

    walk(doc, [])
    return doc


def outcome(doc: Any, t: Transforms, walk: Any) -> Any:
    try:
        return walk(copy.deepcopy(doc), t)
    except TransformError as exc:
        return ("error", exc.path, exc.reason)


PARTS = [
    part
    for name in ("cki-v5.json", "cki-v1.json", "kernelci-v1.json")
    for part in split_document(sample(name), 40)
]
TRANSFORMS = {
    "v1": V1_TRANSFORMS,
    "drop": Transforms(relative_urls=RelativeUrls.DROP, origins={"redhat": "cki"}),
    "no-base": Transforms(relative_urls=RelativeUrls.RESOLVE),
    "missing-field": Transforms(relative_urls=RelativeUrls.RESOLVE, url_base="https://s/{nope}/"),
}


@pytest.mark.parametrize("name", TRANSFORMS)
def test_every_sample_part_comes_out_as_the_reference_walk_makes_it(name: str) -> None:
    t = TRANSFORMS[name]
    results = [outcome(part, t, apply_before) for part in PARTS]
    assert results == [outcome(part, t, reference) for part in PARTS]
    if name in ("no-base", "missing-field"):  # the errors were exercised
        assert any(isinstance(r, tuple) and r[1].endswith("log_url") for r in results)


def test_the_first_refused_field_in_document_order_is_named() -> None:
    doc = {
        "builds": [
            {"id": "a", "misc": {"runs": [{"x": 1}, {"log_url": "deep.log"}]}, "log_url": "b.log"},
            {"log_url": "c.log"},
        ]
    }
    t = TRANSFORMS["no-base"]
    with pytest.raises(TransformError) as err:
        apply_before(copy.deepcopy(doc), t)
    assert err.value.path == "$.builds[0].misc.runs[1].log_url"
    assert outcome(doc, t, apply_before) == outcome(doc, t, reference)


def test_path_to_finds_an_object_by_identity() -> None:
    inner: dict[str, Any] = {"k": 1}
    doc = {"a": [{"b": 1}, {"c": [inner]}], "d": {"k": 1}}
    assert path_to(doc, inner) == ["a", 1, "c", 0]
    assert path_to(doc, doc) == []
    assert path_to(doc, {"k": 1}) == []  # an equal object elsewhere is not it
