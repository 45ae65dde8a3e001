"""The JSON values Conveyor keeps: what both databases store and give back exactly.

JSON itself sets no limits; the stores do. Integers beyond 64 bits come back from SQLite
as floats (rounded, or infinite); NaN and infinities are not JSON; a lone surrogate is not
text; and values nested hundreds deep break whoever walks them next (a validator, a
serialiser, a reader's parser). Each is refused where it enters, naming where it is.
"""

from __future__ import annotations

import math
from typing import Any

INT_MIN, INT_MAX = -(2**63), 2**63 - 1
MAX_DEPTH = 200  # arrays and objects inside one another


def problem_in(value: Any) -> tuple[list[Any], str] | None:
    """Where in `value` (a path of keys and indexes) the first value no store keeps is,
    and what is wrong with it; None when all is well. Iterative: a deep value must not
    exhaust the stack that is checking it."""
    todo: list[tuple[Any, list[Any]]] = [(value, [])]
    while todo:
        node, path = todo.pop()
        if isinstance(node, bool) or node is None:
            continue
        if isinstance(node, int):
            if not INT_MIN <= node <= INT_MAX:
                return path, "an integer beyond 64 bits is not kept exactly: send it as a string"
        elif isinstance(node, float):
            if not math.isfinite(node):
                return path, f"{node} is not a JSON number"
        elif isinstance(node, str):
            if not _is_text(node):
                return path, "a string holds a lone surrogate, which is not Unicode text"
        elif isinstance(node, dict | list):
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
