"""Durable writes: the one way RUN_DIR files reach the shared filesystem.

A reader (another rank, `hpcalign status`, a resumed job) must see a file whole or not at
all, and a crash right after a write must not lose it. So every write goes: temp name in
the same directory -> write -> fsync the file -> rename over the final name -> fsync the
directory (the rename itself lives in the directory's metadata: without that fsync a node
crash can bring back the old name). Directories (checkpoints, models) follow the same
pattern: written under a temp name, `fsync_tree`, renamed, `fsync_dir` of the parent.

    atomic_write_text(os.path.join(run_dir, "state.json"), json.dumps(state) + "\\n")
"""

from __future__ import annotations

import os
import uuid

from hpcalign import faults

PRIVATE_UMASK = 0o077


def keep_private() -> int:
    """Files and directories this process creates are its user's alone (0600 / 0700).

    RUN_DIR is 0700, but its contents (weights, rollouts, logs, the config) must stay
    private even if the directory is later moved, copied or opened up; so every process
    that writes RUN_DIR (the launcher commands, the rank entries, the Slurm job script's
    helpers) sets this umask first, and the children it starts inherit it. Returns the
    previous umask (for an in-process caller that restores it)."""
    return os.umask(PRIVATE_UMASK)


def fsync_dir(path: str) -> None:
    """Make a rename/creation inside `path` durable (a no-op where directories can't be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories: nothing more to do
        pass
    finally:
        os.close(fd)


def temp_name(path: str) -> str:
    """A unique sibling of `path` (same filesystem, so the rename is atomic)."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write_bytes(path: str, data: bytes, mode: int = 0o600) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one."""
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        faults.maybe_fire("atomic-write", path=path)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(os.path.dirname(path) or ".")


def atomic_write_text(path: str, text: str, mode: int = 0o600) -> None:
    """`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode(), mode)


def fsync_tree(path: str) -> None:
    """fsync every file and directory under `path` (before renaming a directory into place)."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def remove_stale_temps(directory: str, name: str) -> None:
    """Remove the temp files `temp_name` made for `directory/name` (dead writers' leftovers)."""
    prefix = f".{name}.tmp-"
    try:
        entries = os.listdir(directory)
    except OSError:
        return
    for entry in entries:
        if entry.startswith(prefix):
            try:
                os.unlink(os.path.join(directory, entry))
            except OSError:
                pass
