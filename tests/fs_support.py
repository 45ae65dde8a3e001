"""Reading a folder's inode flags (what `lsattr -d` shows), for the placement tests."""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

# <linux/fs.h>: _IOR('f', 1, long); the kernel writes a 4-byte int
FS_IOC_GETFLAGS = 0x80006601 | struct.calcsize("l") << 16
TOPDIR_FL = 0x00020000  # "T"
EXTENTS_FL = 0x00080000  # "e": a file or folder of ext4 (with extents)


def folder_flags(path: Path | str) -> int | None:
    """The folder's flags; None where its file system has none to show (tmpfs, say)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return int(struct.unpack("I", fcntl.ioctl(fd, FS_IOC_GETFLAGS, bytes(4)))[0])
    except OSError:
        return None
    finally:
        os.close(fd)
