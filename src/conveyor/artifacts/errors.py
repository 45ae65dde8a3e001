"""The artifact store's errors."""

from __future__ import annotations


class ArtifactError(Exception):
    """The artifact store failed (unreachable, timed out, refused); the message says
    which key and why."""


class ArtifactMissing(ArtifactError, LookupError):
    """No object under that key."""


class ArtifactKeyError(ArtifactError, ValueError):
    """A key (or key template) that could escape its store or cannot be used."""
