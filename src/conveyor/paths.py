"""Path mapping and path safety: the files a request names, as the task will see them.

A pipeline declares which params fields hold paths (`paths`, selectors such as
`logs_to_process[*].rawbinlog_bin`), how submitters' names map onto this side
(`path_map`, e.g. `P:/` -> `/mnt/p/`) and where tasks may read and write (`roots`).
Every declared path is decided here, at submit, by pure functions:

1. refused outright: not a string, empty, NUL or other control characters, lone
   surrogates, percent-encoded `.` `/` `\\` or NUL (`%2e%2e`), Unicode look-alikes of
   `.` `/` `\\` (fullwidth full stops), UNC and device paths (`\\\\server\\share`, `//server`);
2. backslashes become slashes (requests come from Windows users, so a backslash is a
   separator, never part of a name) and runs of slashes collapse;
3. mapped by the longest matching `path_map` prefix (a drive letter matches in either
   case, as on Windows); a drive letter no rule maps is refused;
4. normalised (`.` and `..` resolved lexically, after mapping, so `..` cannot climb out
   of a mapped drive); it must then be absolute;
5. where a root exists on this machine, symlinks are resolved (`os.path.realpath`) on
   both sides before the containment test, so a link inside a root that points out of
   it is refused.

The task then sees the mapped, normalised path (not the symlink-resolved one).
"""

from __future__ import annotations

import os
import posixpath
import re
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_DRIVE = re.compile(r"^([A-Za-z]):(?=/|$)")
_PERCENT = re.compile(r"%(2e|2f|5c|00)", re.IGNORECASE)
_SELECTOR_PART = re.compile(r"\.?([A-Za-z_][A-Za-z0-9_-]*)|\[(\*|\d+)\]")
_SEPARATORS = "./\\"


class PathError(ValueError):
    """A path that is refused; `field` is its JSON path in the params, when known."""

    def __init__(self, message: str, field: str = "$") -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class SelectorError(ValueError):
    pass


Selector = tuple[str | int | None, ...]  # names, indexes, and None for `[*]`


def parse_selector(text: str) -> Selector:
    """`logs[*].bin` -> ('logs', None, 'bin'); a leading `$` or `$.` is allowed."""
    src = text[1:] if text.startswith("$") else text
    if src.startswith("."):
        src = src[1:]
    parts: list[str | int | None] = []
    pos = 0
    while pos < len(src):
        m = _SELECTOR_PART.match(src, pos)
        if m is None or (m.group(0).startswith(".") and not parts):
            raise SelectorError(f"bad path selector {text!r} at character {pos + 1}")
        if m.group(1) is not None:
            parts.append(m.group(1))
        else:
            parts.append(None if m.group(2) == "*" else int(m.group(2)))
        pos = m.end()
    if not parts:
        raise SelectorError(f"empty path selector {text!r}")
    return tuple(parts)


def _json_path(parts: Sequence[str | int]) -> str:
    out = "$"
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def select(value: Any, selector: Selector) -> Iterator[tuple[tuple[str | int, ...], Any]]:
    """Each (concrete path, value) the selector reaches; absent fields are skipped (the
    schema says which are required)."""

    def walk(
        node: Any, rest: Selector, at: tuple[str | int, ...]
    ) -> Iterator[tuple[tuple[str | int, ...], Any]]:
        if not rest:
            yield at, node
            return
        head, tail = rest[0], rest[1:]
        if isinstance(head, str):
            if isinstance(node, Mapping) and head in node:
                yield from walk(node[head], tail, (*at, head))
        elif isinstance(node, list):
            indexes = range(len(node)) if head is None else [head] if head < len(node) else []
            for i in indexes:
                yield from walk(node[i], tail, (*at, i))

    yield from walk(value, selector, ())


def replace_at(value: Any, at: Sequence[str | int], new: Any) -> Any:
    """A copy of `value` with the item at `at` replaced; the original is untouched."""
    if not at:
        return new
    head, rest = at[0], at[1:]
    if isinstance(value, Mapping):
        copy = dict(value)
        copy[head] = replace_at(value[head], rest, new)
        return copy
    items = list(value)
    items[head] = replace_at(items[head], rest, new)  # type: ignore[index]
    return items


def task_selectors(selectors: Sequence[Selector], split: str | None) -> tuple[Selector, ...]:
    """The selectors as seen from one task's params, which `split_params` builds from
    the request's: the split array's items are merged into the task (objects) or put
    under the split name and `item` (anything else)."""
    if split is None:
        return tuple(selectors)
    out: list[Selector] = []
    for sel in selectors:
        if sel[0] == split and len(sel) >= 2 and not isinstance(sel[1], str):
            rest = sel[2:]
            if rest:
                out.append(rest)
            else:
                out.extend([(split,), ("item",)])
        else:
            out.append(sel)
    return tuple(out)


def request_selectors(selectors: Sequence[Selector], split: str | None) -> tuple[Selector, ...]:
    """Every place of a request's params from which a value reaches a declared path
    field of a task: `split_params` gives a task the shared keys and its item's, an
    item's key winning. So a field declared shared (`out`) may also come from an item
    (`logs[*].out`), and one declared per item (`logs[*].bin`) from the shared keys
    (`bin`): each is checked wherever it is given."""
    if split is None:
        return tuple(selectors)
    out = list(selectors)
    scalar = (split, None) in selectors  # items that are no objects: checked as declared
    for sel in task_selectors(selectors, split):
        if sel == (split,) or (scalar and sel == ("item",) and sel not in selectors):
            continue
        for where in (sel, (split, None, *sel)):
            if where not in out:
                out.append(where)
    return tuple(out)


# --- the decision --------------------------------------------------------------------


def _is_windows_prefix(prefix: str) -> bool:
    return _DRIVE.match(prefix) is not None


def _clean(value: str) -> str:
    """Separators unified, runs of slashes collapsed; refuses what must never pass."""
    if not value:
        raise PathError("empty path")
    for ch in value:
        code = ord(ch)
        if code == 0:
            raise PathError("a NUL byte in a path")
        if 0xD800 <= code <= 0xDFFF:
            raise PathError("a lone surrogate in a path (not valid Unicode text)")
        if code < 0x20 or code == 0x7F or 0x80 <= code < 0xA0:
            raise PathError(f"a control character (U+{code:04X}) in a path")
        if ch not in _SEPARATORS and ord(ch) > 0x7F:
            folded = unicodedata.normalize("NFKC", ch)
            if any(s in folded for s in _SEPARATORS):
                raise PathError(f"U+{code:04X} looks like '{folded}' and is not allowed")
    if _PERCENT.search(value):
        raise PathError("a percent-encoded '.', '/', '\\' or NUL in a path")
    unified = value.replace("\\", "/")
    if unified.startswith("//"):
        raise PathError("UNC and device paths (\\\\server\\share) are not allowed")
    return re.sub(r"/{2,}", "/", unified)


def _strip(prefix: str) -> str:
    return prefix.replace("\\", "/").rstrip("/")


def _prefix_match(path: str, prefix: str) -> str | None:
    """The rest of `path` after `prefix` (a whole-component match), or None."""
    base = _strip(prefix)
    if not base:  # the root, `/`: every absolute path, and nothing else
        return path if path.startswith("/") else None
    head = path[: len(base)]
    same = head.lower() == base.lower() if _is_windows_prefix(base) else head == base
    if not same:
        return None
    rest = path[len(base) :]
    if rest and not rest.startswith("/"):
        return None
    return rest


def _join(target: str, rest: str) -> str:
    """`rest` (after a matched prefix: empty or from a slash on) under `target`; the
    target itself when `rest` is empty, as a root (`P:/`, `/`) where it is a bare drive
    or the root (`P:` alone would be the current folder of drive P)."""
    joined = _strip(target) + rest
    if not joined:
        return "/"
    return joined + "/" if _DRIVE.match(joined) and len(joined) == 2 else joined


def map_path(value: str, path_map: Sequence[tuple[str, str]]) -> str:
    """The path as this side sees it: the longest matching prefix rewritten. Separators
    are unified first; `.` and `..` are left for `check_path`."""
    path = _clean(value)
    best: tuple[int, str, str] | None = None
    for source, target in path_map:
        rest = _prefix_match(path, source)
        if rest is not None and (best is None or len(_strip(source)) > best[0]):
            best = (len(_strip(source)), target, rest)
    if best is None:
        drive = _DRIVE.match(path)
        if drive:
            raise PathError(f"drive {drive.group(1).upper()}: is not mapped")
        return path
    _, target, rest = best
    return _join(target, rest)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


@dataclass(frozen=True)
class PathRules:
    """One pipeline's (or host's) rules; `fields` are parsed selectors."""

    path_map: tuple[tuple[str, str], ...] = ()
    roots: tuple[str, ...] = ()
    fields: tuple[Selector, ...] = ()

    @property
    def active(self) -> bool:
        return bool(self.fields)


def check_path(
    value: Any,
    rules: PathRules,
    realpath: Callable[[str], str] | None = os.path.realpath,
    exists: Callable[[str], bool] = os.path.isdir,
) -> str:
    """The mapped, normalised path, or PathError saying why it is refused. `realpath`
    and `exists` are the file-system look-ups (None: decide lexically only)."""
    if not isinstance(value, str):
        raise PathError("a path must be a string")
    mapped = map_path(value, rules.path_map)
    if _DRIVE.match(mapped):
        raise PathError(f"{value!r} maps to a Windows path {mapped!r}; map it to a local one")
    if not mapped.startswith("/"):
        raise PathError(f"{value!r} is not an absolute path")
    normal = posixpath.normpath(mapped)
    if normal.startswith("//"):  # POSIX keeps a leading '//' as is
        normal = "/" + normal.lstrip("/")
    for root in rules.roots:
        root_n = posixpath.normpath(root)
        if not _inside(normal, root_n):
            continue
        # Resolve links on both sides: a link inside the root may point out of it, and
        # the root itself may be a link.
        if (
            realpath is not None
            and exists(root_n)
            and not _inside(realpath(normal), realpath(root_n))
        ):
            raise PathError(f"{value!r} leads out of {root_n} through a symbolic link")
        return normal
    allowed = ", ".join(rules.roots) or "none declared"
    raise PathError(f"{value!r} ({normal}) is outside the allowed roots ({allowed})")


def check_params_paths(
    params: Any,
    rules: PathRules,
    realpath: Callable[[str], str] | None = os.path.realpath,
    exists: Callable[[str], bool] = os.path.isdir,
) -> Any:
    """Params with every declared path checked and mapped; PathError names the field."""
    out = params
    for selector in rules.fields:
        for at, value in list(select(params, selector)):
            try:
                mapped = check_path(value, rules, realpath, exists)
            except PathError as exc:
                raise PathError(exc.message, _json_path(at)) from None
            if mapped != value:
                out = replace_at(out, at, mapped)
    return out


def rewrite_prefixes(value: Any, path_map: Sequence[tuple[str, str]]) -> Any:
    """Every string in `value` (at any depth) that starts with a mapped prefix,
    rewritten: for results, whose paths are reported in the submitter's terms. Strings
    that are not under a prefix are left alone."""
    if isinstance(value, str):
        best: tuple[int, str, str] | None = None
        for source, target in path_map:
            rest = _prefix_match(value, source) if source else None
            if rest is not None and (best is None or len(_strip(source)) > best[0]):
                best = (len(_strip(source)), target, rest)
        return value if best is None else _join(best[1], best[2])
    if isinstance(value, Mapping):
        return {k: rewrite_prefixes(v, path_map) for k, v in value.items()}
    if isinstance(value, list):
        return [rewrite_prefixes(v, path_map) for v in value]
    return value


def reverse(path_map: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    return tuple((target, source) for source, target in path_map)


def rewrite_fields(
    params: Any, selectors: Sequence[Selector], path_map: Sequence[tuple[str, str]]
) -> Any:
    """The declared path fields of (already checked) task params, prefix-rewritten, for
    a host that sees the same files under other names."""
    if not path_map:
        return params
    out = params
    for selector in selectors:
        for at, value in list(select(params, selector)):
            if isinstance(value, str):
                new = rewrite_prefixes(value, path_map)
                if new != value:
                    out = replace_at(out, at, new)
    return out
