"""Validation of a submission: KCIDB's schema lineage (any version, upgraded to the
latest) for the `kcidb` sink, a JSON Schema for the others. A failure names the JSON
path and the reason."""

from __future__ import annotations

import functools
import re
from typing import Any, Protocol

from conveyor.pipelines import json_path


class Invalid(ValueError):
    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class Validator(Protocol):
    def __call__(self, doc: Any) -> Any:
        """The data, valid (upgraded where the schema has versions); raises Invalid."""


def _best(errors: Any) -> Invalid | None:
    from jsonschema.exceptions import best_match

    err = best_match(errors)
    if err is None:
        return None
    return Invalid(json_path(err.absolute_path), err.message)


# How fastjsonschema's generated code names an array item for its error messages:
# `"<prefix>[{i}]".format(**locals())`, a dictionary of every local variable built for
# each item of each array, which is about a third of the time it takes to validate a
# KCIDB document. The same text, built directly.
_ITEM_NAME = re.compile(r'"((?:\.\w+)*)\[\{(\w+)\}\]"\.format\(\*\*locals\(\)\)')


@functools.cache
def _compiled(version: Any) -> Any:
    """A KCIDB schema version compiled to Python (15 to 30 ms of CPU each): once per
    process, like kcidb-io's own validators, and inherited by forked workers.

    The code is fastjsonschema's (`compile_to_code`, then run as `compile` would), with
    each array item's name built by concatenation instead (`_ITEM_NAME`): the checks
    are the same, and a test holds the verdicts equal to fastjsonschema's own on every
    sample and on broken ones."""
    import fastjsonschema

    code = _ITEM_NAME.sub(r'"\1[" + str(\2) + "]"', fastjsonschema.compile_to_code(version.json))
    namespace: dict[str, Any] = {}
    exec(compile(code, f"<kcidb schema {version}>", "exec"), namespace)  # noqa: S102
    # The entry point is named after the schema's scope: `validate` while the schema has
    # no `$id` (no KCIDB version has one); fastjsonschema's own code otherwise.
    return namespace.get("validate") or fastjsonschema.compile(version.json)


class KcidbValidator:
    """kcidb-io: the document's own schema version is found in KCIDB's lineage, the
    document validated against it, and upgraded to the latest version (the upgraded
    data is what is kept).

    Validation first runs kcidb-io's schema of that version compiled to Python code
    (fastjsonschema: several times faster than interpreting it, and validation is the
    ingester's main cost). A document it refuses is validated again by kcidb-io itself,
    whose verdict and error message (with the JSON path) are the ones that count."""

    def __init__(self) -> None:
        import kcidb_io
        from fastjsonschema import JsonSchemaException
        from kcidb_io.schema.abstract import InheritanceImpossible

        self.latest = kcidb_io.schema.LATEST
        # looked up once: an import statement costs about a microsecond per document
        self._fast_refused = JsonSchemaException
        self._impossible = InheritanceImpossible
        # a document's `version` value -> its schema version: kcidb-io looks at nothing
        # else, and walks its whole lineage for each document
        self._versions: dict[Any, Any] = {}

    def warm(self) -> None:
        """Compile every version of the lineage now (about 0.3 s in all, once per
        process): forked workers inherit them, so none compiles one on its first old
        document (and a new pool, one per `--once` run, would again)."""
        for version in self.latest.history:
            self._fast(version)

    def _fast(self, version: Any) -> Any:
        return _compiled(version)

    def _version_of(self, doc: dict[str, Any]) -> Any:
        value = doc.get("version")
        key = tuple(value.items()) if isinstance(value, dict) else value
        try:
            return self._versions[key]
        except KeyError:
            pass
        except TypeError:  # not hashable: no such version
            return self.latest.get_exactly_compatible(doc)
        version = self.latest.get_exactly_compatible(doc)
        if version is not None and len(self._versions) < 64:  # a few spellings of each
            self._versions[key] = version
        return version

    def __call__(self, doc: Any) -> Any:
        if not isinstance(doc, dict):
            raise Invalid("$", f"expected a KCIDB object, got {type(doc).__name__}")
        version = self._version_of(doc)
        if version is None:
            raise Invalid(
                "$.version",
                f"no KCIDB schema version {doc.get('version')!r} "
                f"(known: {', '.join(str(v) for v in self.latest.history)})",
            )
        try:
            self._fast(version)(doc)
        except self._fast_refused:
            self._refuse(version, doc)
        if version is self.latest:
            return doc
        try:
            return self.latest.upgrade(doc, copy=False)
        except self._impossible as exc:
            # the upgrade works in place: the path is found again in the file as sent
            raise NotUpgradable("$", f"cannot upgrade from schema {version}: {exc}") from None

    @staticmethod
    def _refuse(version: Any, doc: Any) -> None:
        """kcidb-io's own verdict and message on a document the fast check refused."""
        from jsonschema.exceptions import ValidationError
        from kcidb_io.schema.abstract import _build_validator_for

        validator = _build_validator_for(version)
        try:
            validator.validate(doc)
        except ValidationError:
            bad = _best(validator.iter_errors(doc))
            if bad is not None:
                raise bad from None
            raise


class NotUpgradable(Invalid):
    """Valid for its own schema version, but kcidb-io cannot carry it to the latest."""

    def located(self, original: Any) -> Invalid:
        return Invalid(where_value(original, self.reason), self.reason)


def where_value(doc: Any, message: str) -> str:
    """The JSON path of the first string value quoted in `message` (kcidb-io names the
    value that stopped an upgrade, not where it is); `$` when none is found."""
    stack: list[tuple[Any, list[Any]]] = [(doc, [])]
    while stack:
        node, path = stack.pop(0)
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for k, v in items:
            if isinstance(v, str):
                if len(v) > 3 and f"'{v}'" in message:
                    return json_path([*path, k])
            elif isinstance(v, dict | list):
                stack.append((v, [*path, k]))
    return "$"


class JsonSchemaValidator:
    def __init__(self, schema: Any) -> None:
        from jsonschema import FormatChecker
        from jsonschema.validators import validator_for

        self._v = validator_for(schema)(schema, format_checker=FormatChecker())

    def __call__(self, doc: Any) -> Any:
        bad = _best(self._v.iter_errors(doc))
        if bad is not None:
            raise bad
        return doc


class NoValidation:
    def __call__(self, doc: Any) -> Any:
        return doc
