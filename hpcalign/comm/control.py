"""MPI control plane: small JSON messages between ranks, every wait bounded.

Why not `comm.recv`: mpi4py's object messages are pickles, and a blocking MPI receive
busy-polls a core that the other role needs on a small machine. Here messages are JSON
bytes in MPI byte buffers, and waits poll `Iprobe` with a short sleep until a deadline;
a peer that stays silent raises `RoleTimeoutError` naming that peer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from mpi4py import MPI

from hpcalign.errors import RoleTimeoutError

# Message tags: one per kind of conversation, so MPI's per-(source, tag) ordering holds.
TAG_SHARD = 11  # generator -> trainers: a published shard
TAG_CONTROL = 12  # trainer 0 -> generators: {"kind": "sync"|"stop", ...}
TAG_RENDEZVOUS = 13  # trainer 0 -> all: torch.distributed address
TAG_TRAINERS = 14  # trainer 0 -> other trainers: {"kind": "sft-saved", "path": ...}
TAG_SCHEDULE = 15  # world rank 0 -> all: the flow's schedule digest (flows/api.py)
TAG_MODEL = 16  # trainer -> an exclusive model's rank: a request (comm/model_service.py)

CONTROL_KINDS = ("sync", "stop")  # what trainer 0 sends generators on TAG_CONTROL

SEND_PROGRESS_S = 1.0
_SLEEP_MIN_S = 0.0002
_SLEEP_MAX_S = 0.005


class Control:
    """JSON messages over one MPI communicator with bounded waits."""

    def __init__(self, comm: MPI.Comm, timeout_s: float, describe: Callable[[int], str]) -> None:
        self.comm = comm
        self.rank = comm.Get_rank()
        self.timeout_s = timeout_s
        self.describe = describe
        self._pending: list[tuple[MPI.Request, bytes]] = []

    def send(self, obj: dict[str, Any], dest: int, tag: int) -> None:
        """Send without blocking for long; the buffer stays alive until the send completes.

        NOTE: Open MPI's TCP transport connects on the first message and only while the
        sender keeps calling MPI: a sender that goes straight into a long torch call (the
        rendezvous, a training step) would hold the message back. So each send is driven
        for up to `SEND_PROGRESS_S` (a small message completes in microseconds once
        connected); what is still pending then is driven by later calls and `flush`.
        """
        data = json.dumps(obj).encode()
        request = self.comm.Isend([data, MPI.BYTE], dest=dest, tag=tag)
        self._pending.append((request, data))
        deadline = time.monotonic() + SEND_PROGRESS_S
        while not request.Test() and time.monotonic() < deadline:
            time.sleep(_SLEEP_MIN_S)
        self._pending = [(r, d) for r, d in self._pending if not r.Test()]

    def poll(self, source: int, tag: int) -> dict[str, Any] | None:
        """The next message from `source` with `tag` if one has arrived, else None."""
        status = MPI.Status()
        if not self.comm.Iprobe(source=source, tag=tag, status=status):
            return None
        buf = bytearray(status.Get_count(MPI.BYTE))
        self.comm.Recv([buf, MPI.BYTE], source=status.Get_source(), tag=tag)
        return json.loads(buf.decode())

    def recv(self, source: int, tag: int, what: str, timeout_s: float | None = None) -> dict[str, Any]:
        """Wait for one message; raise RoleTimeoutError naming `source` past the deadline."""
        limit = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + limit
        sleep = _SLEEP_MIN_S
        while True:
            message = self.poll(source, tag)
            if message is not None:
                return message
            if time.monotonic() > deadline:
                raise RoleTimeoutError(
                    f"{self.describe(self.rank)} waited {limit:.0f} s for {what} from "
                    f"{self.describe(source)}, which sent nothing: it is hung, dead or too slow "
                    f"(raise comm.timeout_s if it is only slow)"
                )
            time.sleep(sleep)
            sleep = min(sleep * 1.5, _SLEEP_MAX_S)

    def flush(self) -> None:
        """Complete outstanding sends (bounded), e.g. before a clean exit."""
        deadline = time.monotonic() + self.timeout_s
        for request, _ in self._pending:
            while not request.Test():
                if time.monotonic() > deadline:
                    raise RoleTimeoutError(f"{self.describe(self.rank)}: a send did not complete")
                time.sleep(_SLEEP_MIN_S)
        self._pending.clear()
