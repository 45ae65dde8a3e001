"""Artifacts: where each attempt's log, its work directory and its outputs are kept.

Two things live here. `LocalArtifacts` is the worker's local scratch space beside the
database: `logs/<request>/<task>/attempt-<n>.log` and `work/<request>/<task>/`. An
`ArtifactStore` is where outputs (and, for a remote store, logs) are kept for others
to fetch, behind one interface chosen by URL (`open_artifact_store`): a local directory
(the default) or any S3-compatible endpoint (`s3://bucket/prefix`).
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import os
import struct
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from conveyor.artifacts.errors import ArtifactError, ArtifactKeyError, ArtifactMissing
from conveyor.artifacts.keys import check_key


class LocalArtifacts:
    """Logs are `logs/<request>/<task>.attempt-<n>.log`: one directory per request, not
    per task, as each new directory or file is an inode to allocate on the critical
    path of every attempt. (Logs written as `logs/<request>/<task>/attempt-<n>.log`,
    the layout before, are still found.)"""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._root = str(self.root)

    def prepare(self) -> None:
        """Make `logs` and `work`, each marked as the top of a tree of unrelated folders
        (a worker does this when it starts): each request's folders then get a place on
        the disk of their own, away from where files were deleted lately, which makes
        creating its attempts' files cheaper on ext4 (see `spread_subfolders`)."""
        for kind in ("logs", "work"):
            folder = f"{self._root}/{kind}"
            os.makedirs(folder, exist_ok=True)
            spread_subfolders(folder)

    def log_path(self, request_id: int, task_id: int, attempt: int) -> Path:
        path = self.attempt_paths(request_id, task_id, attempt)[0]
        if not os.path.exists(path):
            legacy = self._legacy_log(request_id, task_id, attempt)
            if os.path.exists(legacy):
                return Path(legacy)
        return Path(path)

    def _legacy_log(self, request_id: int, task_id: int, attempt: int) -> str:
        return f"{self._root}/logs/{request_id}/{task_id}/attempt-{attempt}.log"

    def attempt_paths(self, request_id: int, task_id: int, attempt: int) -> tuple[str, str]:
        """An attempt's log file and its task's work directory, as plain strings: the
        worker asks for them once per attempt."""
        return (
            f"{self._root}/logs/{request_id}/{task_id}.attempt-{attempt}.log",
            f"{self._root}/work/{request_id}/{task_id}",
        )

    def attempts_logged(self, request_id: int, task_id: int, upto: int | None = None) -> list[int]:
        """The attempts of a task that have a log, oldest first. `upto`: the task's
        attempts so far, when known: then only those are looked for (a request's folder
        may hold the logs of thousands of tasks)."""
        folder = f"{self._root}/logs/{request_id}"
        found: set[int] = set()
        if upto is not None:
            found = {
                n
                for n in range(1, upto + 2)  # a released attempt's number comes again
                if os.path.exists(f"{folder}/{task_id}.attempt-{n}.log")
            }
        else:
            prefix = f"{task_id}.attempt-"
            try:
                with os.scandir(folder) as entries:
                    for entry in entries:
                        if entry.name.startswith(prefix) and entry.name.endswith(".log"):
                            with contextlib.suppress(ValueError):
                                found.add(int(entry.name[len(prefix) : -len(".log")]))
            except FileNotFoundError:
                return []
        legacy = Path(folder) / str(task_id)
        if legacy.is_dir():
            for p in legacy.glob("attempt-*.log"):
                with contextlib.suppress(ValueError):
                    found.add(int(p.stem.split("-", 1)[1]))
        return sorted(found)

    def work_dir(self, request_id: int, task_id: int) -> Path:
        """A scratch directory for the task (made by whoever first needs it)."""
        return Path(self.attempt_paths(request_id, task_id, 0)[1])


# <linux/fs.h>: the ioctls of an inode's flags (numbered for a C long, though the
# kernel reads and writes a 4-byte int, as e2fsprogs passes it), and the flag of a
# folder whose subfolders are unrelated to each other ("chattr +T").
_LONG = struct.calcsize("l")
_FS_IOC_GETFLAGS = 0x80006601 | _LONG << 16
_FS_IOC_SETFLAGS = 0x40006602 | _LONG << 16
_FS_TOPDIR_FL = 0x00020000


def spread_subfolders(folder: str) -> bool:
    """Mark `folder` as the top of a tree of unrelated folders, where the file system
    knows the mark (ext2/3/4). Each new subfolder of it is then placed as the file
    system places folders at its root: in a block group with room and few folders,
    not next to `folder`, and the files made in the subfolder go in its group. That
    matters on ext4 without a journal: there, making a file in a group where many
    files were deleted in the last minutes costs up to a millisecond of kernel CPU
    (each recently freed inode is passed over), against about 30 µs elsewhere; and a
    service deletes thousands at once (retention; a test or a build in the same
    folder). Only a folder of this process's user is marked, never one reached through
    a symbolic link; `chattr -T` takes the mark off. Returns whether the mark is set;
    where it is not known, nothing changes.

    Written here, not taken from a library: it is two ioctls (what `chattr +T` does),
    and no maintained Python package offers them."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if os.fstat(fd).st_uid != os.geteuid():
            return False
        flags = struct.unpack("I", fcntl.ioctl(fd, _FS_IOC_GETFLAGS, bytes(4)))[0]
        if not flags & _FS_TOPDIR_FL:
            fcntl.ioctl(fd, _FS_IOC_SETFLAGS, struct.pack("I", flags | _FS_TOPDIR_FL))
        return True
    except OSError:  # not ext2/3/4 (tmpfs, xfs, NFS...)
        return False
    finally:
        os.close(fd)


class ArtifactKind(enum.StrEnum):
    OUTPUT = "output"  # a file the attempt wrote that matched the pipeline's outputs
    LOG = "log"  # the attempt's log


@dataclass(frozen=True)
class ArtifactRef:
    """An object as stored: its key, where to reach it, its size and content hash."""

    key: str
    url: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Artifact:
    """An artifact record of one task attempt."""

    task_id: int
    request_id: int
    attempt: int
    kind: ArtifactKind
    name: str  # outputs: the path relative to the work dir; logs: attempt-<n>.log
    key: str
    url: str
    size: int
    sha256: str
    created_at: float


class Readable(Protocol):
    """A binary stream being downloaded."""

    def read(self, n: int = -1, /) -> bytes: ...

    def close(self) -> None: ...


class ArtifactStore(Protocol):
    """One place objects are kept. Every method raises ArtifactError with a clear
    reason (ArtifactMissing for an unknown key) and none waits without a time limit."""

    location: str  # the store's URL
    remote: bool  # whether machines other than this one can reach what it keeps

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> str:
        """Store `data` under `key`; returns the stored object's URL."""
        ...

    def put_file(self, key: str, path: Path, content_type: str | None = None) -> ArtifactRef: ...

    def exists(self, key: str) -> bool: ...

    def open(self, key: str) -> Readable: ...

    def url(self, key: str) -> str: ...

    def link(self, key: str, expires: float) -> str | None:
        """A URL anyone may download from for `expires` seconds, where the store can
        make one (S3: a presigned URL); None otherwise."""
        ...

    def delete(self, key: str) -> None: ...

    def close(self) -> None: ...


def open_artifact_store(
    url: str,
    *,
    timeout: float = 30.0,
    retries: int = 3,
    endpoint_url: str | None = None,
    region: str | None = None,
    profile: str | None = None,
) -> ArtifactStore:
    """The store for a URL: `s3://bucket[/prefix]` (any S3-compatible endpoint with
    `endpoint_url`), else a local directory (a path or `file://` URL). `timeout` bounds
    each connect and each read; `retries` failed calls are tried again with back-off."""
    if url.startswith("s3://"):
        from conveyor.artifacts.s3 import S3Store

        return S3Store(
            url,
            timeout=timeout,
            retries=retries,
            endpoint_url=endpoint_url,
            region=region,
            profile=profile,
        )
    if is_remote_url(url):
        scheme = url.split("://", 1)[0]
        raise ArtifactError(
            f"unsupported artifact store URL scheme {scheme!r}: use s3:// or a path"
        )
    from conveyor.artifacts.local import LocalStore

    return LocalStore(local_store_path(url))


def is_file_url(url: str) -> bool:
    """A `file:` URL (any case), as against a path or another scheme's URL."""
    return url[:5].lower() == "file:"


def is_remote_url(url: str) -> bool:
    """A store URL that is not a local directory (a path or a `file:` URL)."""
    return "://" in url and not is_file_url(url)


def local_store_path(url: str) -> Path:
    """The directory of a local store's URL: a path, or a `file:` URL of this host
    (`file:///srv/objects`, `file://localhost/srv/objects`, `file:/srv/objects`;
    percent-escapes decoded to the bytes they stand for).
    A `file:` URL naming another host, a relative path, a query or a fragment is
    refused (ArtifactError): read as a path, `file://otherhost/srv` would be the
    relative folder `otherhost/srv` of whatever directory the process started in."""
    if not is_file_url(url):
        return Path(url)
    parts = urllib.parse.urlsplit(url)
    if parts.netloc.lower() not in ("", "localhost"):
        raise ArtifactError(
            f"artifact store URL {url!r} names the host {parts.netloc!r}: a file URL "
            "is a directory of this host (file:///path or file://localhost/path); "
            "for another host's, use s3:// or a mount of it"
        )
    if parts.query or parts.fragment:
        raise ArtifactError(f"artifact store URL {url!r}: a file URL takes no ? or #")
    path = os.fsdecode(urllib.parse.unquote_to_bytes(parts.path))  # %FF: that byte
    if not path.startswith("/"):
        raise ArtifactError(
            f"artifact store URL {url!r}: a file URL holds an absolute path (file:///path)"
        )
    if "\0" in path:
        raise ArtifactError(f"artifact store URL {url!r}: the path holds a NUL")
    return Path(path)


def latest_outputs(artifacts: Sequence[Artifact]) -> list[Artifact]:
    """What a task shows: the outputs of its latest attempt that recorded any, and the
    log of every attempt, in attempt then name order."""
    outputs = [a for a in artifacts if a.kind == ArtifactKind.OUTPUT]
    last = max((a.attempt for a in outputs), default=None)
    shown = [a for a in artifacts if a.kind == ArtifactKind.LOG or a.attempt == last]
    return sorted(shown, key=lambda a: (a.kind != ArtifactKind.OUTPUT, a.attempt, a.name))


__all__ = [
    "Artifact",
    "ArtifactError",
    "ArtifactKeyError",
    "ArtifactKind",
    "ArtifactMissing",
    "ArtifactRef",
    "ArtifactStore",
    "LocalArtifacts",
    "Readable",
    "check_key",
    "is_file_url",
    "is_remote_url",
    "latest_outputs",
    "local_store_path",
    "open_artifact_store",
    "spread_subfolders",
]
