"""Transforms applied to a submission before it is validated: pure functions over the
parsed JSON, configured per spool.

- URL rewrites: a prefix replaced by another (`git://` → `https://`), for every string
  field named `url` or ending in `_url`.
- Relative URLs (`build.log`) are not URIs. By default they are kept as they are, so
  a schema that wants a URI (KCIDB's) fails the file naming the JSON path and nothing
  is guessed. `relative_urls = "resolve"` joins them to `url_base`, a template filled
  from the object holding the URL (`https://storage.kernelci.org/{revision_origin_id}/
  {architecture}/{misc.defconfig_full}/`), because a relative log URL is relative to its
  own object's directory, not to one base; `"drop"` removes the field (the data is then
  lost, so it is never the default).
- Origin normalisation: `origin` values mapped through a table (`kernelci` →
  `maestro`).
- Tree names: after validation, an object with a `git_repository_url` and no
  `tree_name` gets the name the trees file (YAML of `name: url`) gives that URL.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import quote, urljoin

from conveyor.pipelines import json_path


class RelativeUrls(StrEnum):
    KEEP = "keep"
    RESOLVE = "resolve"
    DROP = "drop"


class TransformError(ValueError):
    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class Transforms:
    url_rewrites: tuple[tuple[str, str], ...] = ()
    relative_urls: RelativeUrls = RelativeUrls.KEEP
    url_base: str | None = None
    origins: Mapping[str, str] = field(default_factory=dict)
    trees: Mapping[str, str] = field(default_factory=dict)  # repository URL -> tree name

    @property
    def empty(self) -> bool:
        return not (
            self.url_rewrites
            or self.origins
            or self.trees
            or self.relative_urls is not RelativeUrls.KEEP
        )


def load_trees(path: Path) -> dict[str, str]:
    """A trees file (`name: url` per line, YAML) as a map from URL to name."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ValueError(f"cannot read trees file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"trees file {path} is not YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise ValueError(f"trees file {path}: expected a mapping of tree name to URL")
    return {url.rstrip("/"): name for name, url in data.items()}


def rewrite_url(value: str, t: Transforms) -> str:
    for old, new in t.url_rewrites:
        if value.startswith(old):
            return new + value[len(old) :]
    return value


def apply_before(doc: Any, t: Transforms) -> Any:
    """URL rewrites, relative URLs and origins, in place; raises TransformError."""
    if t.empty:
        return doc
    try:
        _walk(doc, t)
    except _Refused as exc:
        # where the refused field is, found only now: the walk keeps no paths
        where = json_path([*path_to(doc, exc.node), exc.key])
        raise TransformError(where, exc.reason) from None
    return doc


class _Refused(Exception):
    """A field refused by a transform, named by its object and key."""

    def __init__(self, node: dict[str, Any], key: str, reason: str) -> None:
        super().__init__(reason)
        self.node, self.key, self.reason = node, key, reason


_CONTAINERS = (dict, list)  # a tuple: isinstance is quicker with it than with `dict | list`


def _walk(node: Any, t: Transforms) -> None:
    """Depth first, in document order, so the first refused field is the one a reader
    meets first. Deletions (`drop`) wait for the end of their object's loop."""
    if isinstance(node, dict):
        dropped: list[str] = []
        for key, value in node.items():
            if isinstance(value, str):
                if key.endswith("url") and (key == "url" or key.endswith("_url")):
                    if _fix_url(node, key, value, t):
                        dropped.append(key)
                elif key == "origin" and value in t.origins:
                    node[key] = t.origins[value]
            elif isinstance(value, _CONTAINERS):
                _walk(value, t)
        for key in dropped:
            del node[key]
    elif isinstance(node, list):
        for item in node:
            if isinstance(item, _CONTAINERS):
                _walk(item, t)


def path_to(doc: Any, target: Any) -> list[Any]:
    """The path from `doc` to the object `target` (the first place it is found, in the
    walk's order); [] when it is `doc` or nowhere."""
    stack: list[tuple[Any, list[Any]]] = [(doc, [])]
    while stack:
        node, path = stack.pop()
        if node is target:
            return path
        items = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
        # pushed last to first: popped in document order
        stack.extend((v, [*path, k]) for k, v in reversed(items) if isinstance(v, _CONTAINERS))
    return []


def _fix_url(node: dict[str, Any], key: str, value: str, t: Transforms) -> bool:
    """Rewrites or resolves `node[key]` in place; True when the field is to be dropped."""
    if t.url_rewrites:
        value = rewrite_url(value, t)
        node[key] = value
    if not value or _SCHEME.match(value):
        return False
    if t.relative_urls is RelativeUrls.RESOLVE and t.url_base:
        node[key] = urljoin(_fill(t.url_base, node, key), value)
    elif t.relative_urls is RelativeUrls.DROP:
        return True
    elif t.relative_urls is RelativeUrls.RESOLVE:
        raise _Refused(node, key, f"relative URL {value!r} and no url_base to resolve it")
    return False


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_FIELD = re.compile(r"\{([A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*)\}")


def _fill(template: str, node: dict[str, Any], key: str) -> str:
    def value(m: re.Match[str]) -> str:
        found: Any = node
        for part in m.group(1).split("."):
            found = found.get(part) if isinstance(found, dict) else None
        if found is None or isinstance(found, dict | list):
            raise _Refused(
                node, key, f"url_base needs {m.group(1)!r}, which this object does not have"
            )
        return quote(str(found), safe="/")

    return _FIELD.sub(value, template)


def apply_after(doc: Any, t: Transforms) -> Any:
    """Tree names, in place, on validated (and upgraded) data."""
    if not t.trees:
        return doc
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            url = node.get("git_repository_url")
            if isinstance(url, str) and not node.get("tree_name"):
                name = t.trees.get(url.rstrip("/"))
                if name:
                    node["tree_name"] = name
            stack.extend(v for v in node.values() if isinstance(v, dict | list))
        elif isinstance(node, list):
            stack.extend(v for v in node if isinstance(v, dict | list))
    return doc
