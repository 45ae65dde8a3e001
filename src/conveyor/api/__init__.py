"""The HTTP API: a thin adapter over the application object (`create_app(conveyor)`)."""

from __future__ import annotations

from conveyor.api.app import create_app

__all__ = ["create_app"]
