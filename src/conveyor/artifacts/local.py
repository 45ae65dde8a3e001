"""The artifact store in a local directory: the default, for one machine (or several
that mount the same directory)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import BinaryIO

from conveyor.artifacts import ArtifactError, ArtifactMissing, ArtifactRef, Readable
from conveyor.artifacts.keys import check_key

CHUNK = 1024 * 1024


def file_digest(path: Path) -> tuple[int, str]:
    """(size, sha256 hex) of a file about to be stored, read once in chunks; raises
    ArtifactError when it cannot be read."""
    digest = hashlib.sha256()
    size = 0
    try:
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise ArtifactError(f"reading {path}: {exc.strerror or exc}") from None
    return size, digest.hexdigest()


def _umask() -> int:
    """This process's umask, read without changing it (`os.umask` sets it, for every
    thread at once): from /proc on Linux, else the usual 022."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStore:
    remote = False

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.location = self.root.as_uri()

    def _path(self, key: str) -> Path:
        path = (self.root / check_key(key)).resolve()
        # A symlink inside the store must not lead out of it either.
        if not path.is_relative_to(self.root):
            raise ArtifactError(f"artifact key {key!r} leads outside {self.root}")
        return path

    def _write(self, key: str, fill: bytes | Path) -> tuple[int, str]:
        """Write through a temporary file in the same directory, synced, then rename: a
        reader never sees half an object, nor, after a crash, an empty one. The object
        gets the mode a file made by this process would have (`mkstemp` makes it
        private), so that an API server running as another user can read it. Returns
        the size and sha256 of what was written (a file still being written to when it
        is stored is described as stored)."""
        path = self._path(key)
        digest = hashlib.sha256()
        size = 0
        src: BinaryIO
        if isinstance(fill, bytes):
            src = io.BytesIO(fill)
        else:
            try:
                src = fill.open("rb")
            except OSError as exc:
                raise ArtifactError(f"reading {fill}: {exc.strerror or exc}") from None
        try:
            with src:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".upload-")
                try:
                    with os.fdopen(fd, "wb") as out:
                        while chunk := src.read(CHUNK):
                            digest.update(chunk)
                            size += len(chunk)
                            out.write(chunk)
                        out.flush()
                        os.fchmod(out.fileno(), 0o666 & ~_umask())
                        os.fsync(out.fileno())
                    os.replace(tmp, path)
                    _sync_folder(path.parent)  # the rename, before the object is recorded
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
        except OSError as exc:
            raise ArtifactError(f"storing {key} in {self.root}: {exc.strerror or exc}") from None
        return size, digest.hexdigest()

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> str:
        self._write(key, data)
        return self.url(key)

    def put_file(self, key: str, path: Path, content_type: str | None = None) -> ArtifactRef:
        size, sha = self._write(key, path)
        return ArtifactRef(key=key, url=self.url(key), size=size, sha256=sha)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def open(self, key: str) -> Readable:
        try:
            return self._path(key).open("rb")
        except (FileNotFoundError, IsADirectoryError):
            raise ArtifactMissing(f"no artifact {key} in {self.root}") from None
        except OSError as exc:
            raise ArtifactError(f"reading {key} in {self.root}: {exc.strerror or exc}") from None

    def url(self, key: str) -> str:
        return self._path(key).as_uri()

    def link(self, key: str, expires: float) -> str | None:
        return None

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def close(self) -> None:
        pass
