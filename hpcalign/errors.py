"""Errors a user can fix: printed as one line by the CLI, never as a traceback."""

import os
import re


class UserError(Exception):
    """Bad input (config, path, flag) described well enough to fix without reading code."""


class ConfigError(UserError):
    """A config key has a wrong, unknown or out-of-range value."""


class ShardError(UserError):
    """A rollout shard is missing, truncated, corrupted or of an unknown format.

    The message always starts with the shard's path so an operator can find the file.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class RoleTimeoutError(RuntimeError):
    """A rank waited longer than `comm.timeout_s` for a peer; names the silent rank."""


class ProtocolError(RuntimeError):
    """A rank received a control message it cannot act on (a bug, named, never a KeyError)."""


# errno values that mean "the filesystem refuses writes", with what the user can do
_STORAGE_ERRNOS = {28: "free space on RUN_DIR's filesystem, then run again",
                   30: "RUN_DIR's filesystem is read-only: remount it read-write or choose "
                       "another run_dir=, then run again",
                   122: "the disk quota is exceeded: free space, then run again"}


def storage_errno(err: BaseException | None) -> tuple[int, str | None] | None:
    """(errno, path or None) of a failed write to RUN_DIR (disk full, read-only, over quota)
    found in `err` or the exceptions it was raised from/while handling; None if none.

    Libraries word these their own way: HDF5 as a RuntimeError with `errno = 28` inside a
    multi-line text (and a failed close then replaces it with "Slist already enabled?"),
    safetensors as "I/O error: ... (os error 28)"; so the chain is searched, and the texts
    are parsed for an errno and a file name.
    """
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        errno, path = getattr(err, "errno", None), getattr(err, "filename", None)
        text = " ".join(str(err).split())
        if errno not in _STORAGE_ERRNOS:
            match = re.search(r"(?:errno =|os error) (\d+)", text)
            errno = int(match.group(1)) if match else None
        if errno in _STORAGE_ERRNOS:
            named = None if path else re.search(r"filename = '([^']+)'", text)
            return errno, named.group(1) if named else path
        err = err.__cause__ or err.__context__
    return None


def storage_failure(err: BaseException, where: str | None = None) -> str | None:
    """One line for a failed write to RUN_DIR (see `storage_errno`), naming the file (else
    `where`) and what to do; None if `err` is not one."""
    found = storage_errno(err)
    if found is None:
        return None
    errno, path = found
    path = path or where
    prefix = f"{path}: " if path else ""
    return f"{prefix}{os.strerror(errno)} (errno {errno}): {_STORAGE_ERRNOS[errno]}"
