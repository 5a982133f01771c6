"""Errors a user can fix: printed as one line by the CLI, never as a traceback."""


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
