"""Splitting KCIDB submissions into many small files, as a busy spool receives them
(for the benchmark, the tests and trying things out)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# the object lists of every KCIDB schema version (v1 had revisions, not checkouts)
OBJECT_LISTS = ("revisions", "checkouts", "builds", "tests", "issues", "incidents")


def split_document(doc: dict[str, Any], parts: int) -> list[dict[str, Any]]:
    """`doc` as `parts` documents of the same version, each with a slice of every
    object list (together, exactly the objects of `doc`)."""
    parts = max(1, parts)
    out: list[dict[str, Any]] = [{"version": doc["version"]} for _ in range(parts)]
    for key in OBJECT_LISTS:
        objs = doc.get(key) or []
        for i, obj in enumerate(objs):
            out[i * parts // len(objs)].setdefault(key, []).append(obj)
    return [d for d in out if len(d) > 1]


def split_samples(docs: Sequence[dict[str, Any]], files: int) -> list[dict[str, Any]]:
    """`files` documents from several samples, shared in proportion to their objects."""
    sizes = [sum(len(d.get(k) or []) for k in OBJECT_LISTS) for d in docs]
    total = sum(sizes) or 1
    out: list[dict[str, Any]] = []
    for i, (doc, size) in enumerate(zip(docs, sizes, strict=True)):
        left = files - len(out)
        share = left if i == len(docs) - 1 else max(1, round(files * size / total))
        out.extend(split_document(doc, share))
    return out


def write_spool(folder: Path, docs: Sequence[dict[str, Any]], prefix: str = "sub") -> list[Path]:
    """Write each document as `prefix-NNNNNN.json` the way writers should: to a .tmp
    name, then renamed."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, doc in enumerate(docs):
        path = folder / f"{prefix}-{i:06d}.json"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(doc, separators=(",", ":")))
        os.replace(tmp, path)
        paths.append(path)
    return paths
