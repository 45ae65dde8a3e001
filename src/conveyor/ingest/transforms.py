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
    if not t.empty:
        _walk(doc, t, [])
    return doc


def _walk(node: Any, t: Transforms, path: list[Any]) -> None:
    if isinstance(node, dict):
        for key in list(node):
            value = node[key]
            if isinstance(value, str):
                if key.endswith("url") and (key == "url" or key.endswith("_url")):
                    _fix_url(node, key, value, t, path)
                elif key == "origin" and value in t.origins:
                    node[key] = t.origins[value]
            elif isinstance(value, dict | list):
                path.append(key)
                _walk(value, t, path)
                path.pop()
    elif isinstance(node, list):
        for i, item in enumerate(node):
            if isinstance(item, dict | list):
                path.append(i)
                _walk(item, t, path)
                path.pop()


def _fix_url(node: dict[str, Any], key: str, value: str, t: Transforms, path: list[Any]) -> None:
    if t.url_rewrites:
        value = rewrite_url(value, t)
        node[key] = value
    if not value or _SCHEME.match(value):
        return
    if t.relative_urls is RelativeUrls.RESOLVE and t.url_base:
        node[key] = urljoin(_fill(t.url_base, node, [*path, key]), value)
    elif t.relative_urls is RelativeUrls.DROP:
        del node[key]
    elif t.relative_urls is RelativeUrls.RESOLVE:
        raise TransformError(
            json_path([*path, key]), f"relative URL {value!r} and no url_base to resolve it"
        )


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_FIELD = re.compile(r"\{([A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*)\}")


def _fill(template: str, node: dict[str, Any], path: list[Any]) -> str:
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
