"""The spool directory: which files are ready, and where they go.

A file is taken when it is complete: writers that can write `NAME.json.tmp` and rename
it (the `.tmp` is never read); for writers that cannot, a file is taken only once it has
not changed for `settle` seconds. Empty files are deleted (once settled). A file moves
to `archive/` after its rows are committed, or to `failed/` beside a sidecar
`NAME.error.json` naming the stage and the reason. Moves are renames within one file
system, so a file is in exactly one place whatever happens.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path


class Stage(StrEnum):
    READ = "read"
    PARSE = "parse"
    TRANSFORM = "transform"
    VALIDATE = "validate"
    OFFLOAD = "offload"
    MAP = "map"
    SINK = "sink"
    PREPARE = "prepare"  # the process preparing the file died, or a stage raised


@dataclass(frozen=True)
class FileError:
    stage: Stage
    reason: str
    path: str | None = None  # the JSON path, where there is one

    def as_json(self, file: str) -> dict[str, object]:
        data = asdict(self)
        data["stage"] = self.stage.value
        data["file"] = file
        return data


class Spool:
    def __init__(self, root: Path, settle: float = 1.0) -> None:
        self.root = Path(root)
        self.archive_dir = self.root / "archive"
        self.failed_dir = self.root / "failed"
        self.settle = settle
        self._root = str(self.root)
        self._archive = str(self.archive_dir)

    def ensure(self) -> None:
        if not self.root.is_dir():
            raise FileNotFoundError(f"spool directory does not exist: {self.root}")
        self.archive_dir.mkdir(exist_ok=True)
        self.failed_dir.mkdir(exist_ok=True)

    def path(self, name: str) -> Path:
        return self.root / name

    def scan(
        self, skip: set[str] | frozenset[str] = frozenset(), limit: int = 4096
    ) -> tuple[list[str], int]:
        """Up to `limit` ready files (their names, sorted), and how many empty files
        were deleted. With no settle time every file is complete by the writers'
        contract (written as .tmp, then renamed), so none is looked at here: an empty
        one is found when it is read (`delete_empty`), and the scan is a directory
        listing."""
        if self.settle <= 0:
            names = [e.name for e in self._entries() if e.name not in skip]
            names.sort()
            return names[:limit], 0
        now = time.time()
        found: list[str] = []
        deleted = 0
        for entry in self._entries():
            name = entry.name
            if name in skip:
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            if now - st.st_mtime < self.settle:
                continue  # still being written
            if st.st_size == 0:
                deleted += self.delete_empty(name)
                continue
            found.append(name)
        found.sort()
        return found[:limit], deleted

    def delete_empty(self, name: str) -> int:
        """Delete the file if it is still empty; 1 if it was deleted."""
        path = os.path.join(self._root, name)
        try:
            if os.stat(path).st_size == 0:
                os.unlink(path)
                return 1
        except FileNotFoundError:
            pass
        return 0

    def _entries(self) -> Iterator[os.DirEntry[str]]:
        with os.scandir(self.root) as it:
            for entry in it:
                name = entry.name
                if name.endswith(".json") and not name.startswith("."):  # noqa: SIM102
                    if entry.is_file(follow_symlinks=False):
                        yield entry

    def count(self) -> int:
        return sum(1 for _ in self._entries())

    def archive(self, name: str) -> str:
        # plain strings: this runs once per file on the writer's critical path
        target = os.path.join(self._archive, name)
        if os.path.exists(target):
            target = str(_free(self.archive_dir, name))
        os.replace(os.path.join(self._root, name), target)
        return target

    def fail(self, name: str, error: FileError) -> Path:
        """The sidecar first (atomically), then the file: a crash in between leaves the
        file pending, and it fails again (rewriting the sidecar) on restart."""
        target = _free(self.failed_dir, name)
        sidecar = target.with_name(target.name[: -len(".json")] + ".error.json")
        tmp = sidecar.with_name("." + sidecar.name + ".tmp")
        tmp.write_text(json.dumps(error.as_json(name), indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp, sidecar)
        os.replace(self.root / name, target)
        return target


def read_file(path: str) -> bytes:
    """The whole file, with plain system calls: a few times cheaper than
    `Path.read_bytes()` (no path object, no buffered file object), which counts at
    thousands of small files a second."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, _READ_SIZE):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


_READ_SIZE = 1 << 16  # most submissions in one read; below malloc's mmap threshold


def _free(folder: Path, name: str) -> Path:
    """`folder/name`, or, when a file of that name is already there (the same name
    submitted again), a name beside it that is not taken."""
    target = folder / name
    if not target.exists():
        return target
    stem = name[: -len(".json")] if name.endswith(".json") else name
    n = 1
    while True:
        candidate = folder / f"{stem}.{n}.json"
        if not candidate.exists():
            return candidate
        n += 1


def pending_files(folder: Path) -> int:
    """How many submissions wait in a spool directory (0 when it does not exist)."""
    try:
        return Spool(folder, 0).count()
    except OSError:
        return 0
