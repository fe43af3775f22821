"""Durable file writes: flushing files and folders to disk before a rename commits them.

A save is atomic when it is written completely somewhere else first and then committed by one rename; these helpers
make sure the data reaches the disk before that rename does (`AutoModelForCausalLMWithQHead.save_pretrained`,
`QHeadTrainer`'s checkpoint marker).
"""

from __future__ import annotations

import os


def relative_files(folder: str) -> set[str]:
    """Every file below `folder`, as `/`-separated paths relative to it."""
    return {
        os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
        for root, _, names in os.walk(folder)
        for name in names
    }


def fsync_path(path: str) -> None:
    """Flush a file or a directory entry to disk; a path that cannot be opened or synced is passed over."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # directories cannot be fsync'ed on some platforms
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: str) -> None:
    """Flush a folder's files and directories to disk, so a rename that commits them is not reordered before them."""
    for root, _, names in os.walk(folder):
        for name in names:
            fsync_path(os.path.join(root, name))
        fsync_path(root)
