"""Artifacts: where each attempt's log (and, later, outputs) are kept.

The default is a local directory; the layout is `logs/<request>/<task>/attempt-<n>.log`.
"""

from __future__ import annotations

from pathlib import Path


class LocalArtifacts:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._root = str(self.root)

    def log_path(self, request_id: int, task_id: int, attempt: int) -> Path:
        return Path(f"{self._root}/logs/{request_id}/{task_id}/attempt-{attempt}.log")

    def attempts_logged(self, request_id: int, task_id: int) -> list[int]:
        folder = self.root / "logs" / str(request_id) / str(task_id)
        if not folder.is_dir():
            return []
        found = []
        for p in folder.glob("attempt-*.log"):
            try:
                found.append(int(p.stem.split("-", 1)[1]))
            except ValueError:
                continue
        return sorted(found)

    def work_dir(self, request_id: int, task_id: int) -> Path:
        """A scratch directory for the task (made by whoever first needs it)."""
        return Path(f"{self._root}/work/{request_id}/{task_id}")
