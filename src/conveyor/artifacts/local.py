"""The artifact store in a local directory: the default, for one machine (or several
that mount the same directory)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

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

    def _write(self, key: str, fill: object) -> Path:
        """Write through a temporary file in the same directory, then rename: a reader
        never sees half an object."""
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".upload-")
            try:
                with os.fdopen(fd, "wb") as out:
                    if isinstance(fill, bytes):
                        out.write(fill)
                    else:
                        with Path(str(fill)).open("rb") as src:
                            shutil.copyfileobj(src, out, CHUNK)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            raise ArtifactError(f"storing {key} in {self.root}: {exc.strerror or exc}") from None
        return path

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> str:
        self._write(key, data)
        return self.url(key)

    def put_file(self, key: str, path: Path, content_type: str | None = None) -> ArtifactRef:
        size, sha = file_digest(path)
        self._write(key, path)
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
