"""Run under mpiexec -n 2: rank 1 never answers; rank 0 must time out naming rank 1."""

import sys
import time

from mpi4py import MPI

from hpcalign.comm.control import Control
from hpcalign.errors import RoleTimeoutError


def main() -> int:
    comm = MPI.COMM_WORLD
    control = Control(comm, 1.0, lambda r: f"generator {r - 1} (world rank {r})" if r else "trainer 0")
    if comm.Get_rank() == 0:
        start = time.monotonic()
        try:
            control.recv(1, 11, "the shard of step 0")
        except RoleTimeoutError as err:
            waited = time.monotonic() - start
            print(f"TIMEOUT after {waited:.2f}s: {err}", flush=True)
            control.send({"kind": "done"}, dest=1, tag=12)
            control.flush()
            return 0 if 0.9 < waited < 5 else 1
        return 1
    control.recv(0, 12, "done", timeout_s=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
