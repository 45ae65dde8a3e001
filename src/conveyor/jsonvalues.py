"""The JSON values Conveyor keeps: what both databases store and give back exactly.

JSON itself sets no limits; the stores do. NaN and infinities are not JSON; a lone
surrogate is not text; a value nested hundreds deep breaks whoever walks it next (a
validator, a serialiser, a reader's parser); and SQLite takes a value that is a bare
number as a number (its JSON column has numeric affinity), so an integer beyond 64 bits
on its own comes back rounded, or infinite. Each is refused where it enters, naming
where it is.
"""

from __future__ import annotations

import json
import math
from typing import Any

INT_MIN, INT_MAX = -(2**63), 2**63 - 1
MAX_DEPTH = 200  # arrays and objects inside one another


def problem_in(value: Any) -> tuple[list[Any], str] | None:
    """Where in `value` (a path of keys and indexes) the first value no store keeps is,
    and what is wrong with it; None when all is well. The usual case, all well, costs
    one serialisation in C; the value is walked only when something is wrong, or when
    it may be nested too deep."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not INT_MIN <= value <= INT_MAX:
            return [], "a number beyond 64 bits on its own is not kept exactly: send a string"
        return None
    try:
        data = json.dumps(value, allow_nan=False, ensure_ascii=False).encode()
    except (ValueError, TypeError, RecursionError, UnicodeEncodeError):
        return _walk(value) or ([], "not a JSON value")
    if data.count(b"[") + data.count(b"{") >= MAX_DEPTH and _deeper_than_allowed(data):
        return _walk(value)
    return None


# what serialised JSON holds outside its strings besides brackets
_NOT_BRACKETS = b"0123456789+-.eE,: truefalsn"
_ONE_KIND = bytes.maketrans(b"{}", b"[]")


def _deeper_than_allowed(data: bytes) -> bool:
    """Whether serialised JSON nests deeper than MAX_DEPTH. Its strings go first
    (escaped backslashes, then escaped quotes, then what lies between quotes), then all
    but its brackets, which then lose one level of pairs a pass: byte operations in C,
    where walking a wide value in Python would cost several times its serialisation."""
    plain = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside = b"".join(plain.split(b'"')[::2])
    # one kind of bracket (serialised JSON is well formed): a pass removes one level
    brackets = outside.translate(_ONE_KIND, _NOT_BRACKETS)
    for _ in range(MAX_DEPTH):
        if not brackets:
            return False
        brackets = brackets.replace(b"[]", b"")
    return bool(brackets)


def _walk(value: Any) -> tuple[list[Any], str] | None:
    """Iterative: a deep value must not exhaust the stack that is checking it."""
    todo: list[tuple[Any, list[Any]]] = [(value, [])]
    while todo:
        node, path = todo.pop()
        if isinstance(node, bool | int) or node is None:
            continue
        if isinstance(node, float):
            if not math.isfinite(node):
                return path, f"{node} is not a JSON number"
        elif isinstance(node, str):
            if not _is_text(node):
                return path, "a string holds a lone surrogate, which is not Unicode text"
        elif isinstance(node, dict | list | tuple):
            if len(path) >= MAX_DEPTH:
                return path, f"nested deeper than {MAX_DEPTH} levels"
            items = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
            for key, item in reversed(items):  # the first one is looked at first
                if isinstance(key, str) and not _is_text(key):
                    return path, "a key holds a lone surrogate, which is not Unicode text"
                todo.append((item, [*path, key]))
        else:
            return path, f"a {type(node).__name__} is not a JSON value"
    return None


def _is_text(value: str) -> bool:
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True
