"""Data plane: torch.distributed setup and the trainer → generator weight sync.

The world's torch.distributed group mirrors the MPI world (same ranks); its address comes
from trainer 0 over MPI (no directory polling on a shared filesystem) and is also
written to RUN_DIR/rendezvous.json for people. gloo on CPU, NCCL on GPUs: same code.

Weights travel by name (`NamedWeightSender` → `NamedWeightReceiver`): a training engine
exposes named tensors, a generation engine loads named tensors, and the two need not
agree on parameter order, dtype or module layout. At the first sync the sender broadcasts
a `WeightSpec` (names, shapes, dtypes, bucket size; JSON, never pickle); from then on
each sync is one `broadcast` per coalesced bucket, which both sides plan from the spec.

    sender = NamedWeightSender(policy.named_parameters, bucket_mb=64, src=0, group=g)
    receiver = NamedWeightReceiver(load_into_module(model), src=0, group=g, device=dev)
    sender.sync()    # on rank src, once per published version
    receiver.sync()  # on every generator rank, at the same time
"""

from __future__ import annotations

import datetime
import json
import math
import os
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from hpcalign.comm.control import TAG_RENDEZVOUS, Control
from hpcalign.durable import atomic_write_text


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def _own_address() -> str:
    override = os.environ.get("HPCALIGN_MASTER_ADDR")
    if override:
        return override
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def check_backend(backend: str, device: torch.device, who: str) -> None:
    """NCCL moves GPU tensors only: a rank without a GPU cannot join an NCCL world."""
    if backend == "nccl" and device.type != "cuda":
        raise RuntimeError(f"{who} computes on {device} but the world uses NCCL (chosen by "
                           f"rank 0 or comm.dist_backend): give this role GPUs, or set "
                           f"comm.dist_backend=gloo")


def init_distributed(control: Control, run_dir: str, backend: str, timeout_s: float,
                     device: torch.device | None = None, who: str = "this rank") -> str:
    """Start torch.distributed over the MPI world; rank 0 chooses address and backend.

    The address travels as a bounded control message, not a blocking MPI bcast, so a
    silent rank 0 ends in a named timeout rather than a hang. `backend` counts at rank 0
    only ("auto" means gloo there, for callers without a device policy); every other rank
    takes rank 0's, and checks that its `device` can use it. Returns the backend.
    """
    comm = control.comm
    device = torch.device("cpu") if device is None else device
    if comm.Get_rank() == 0:
        if backend == "auto":
            backend = "gloo"
        address = {"host": _own_address(), "port": _free_port(), "backend": backend}
        atomic_write_text(os.path.join(run_dir, "rendezvous.json"), json.dumps(address))
        for rank in range(1, comm.Get_size()):
            control.send(address, dest=rank, tag=TAG_RENDEZVOUS)
    else:
        address = control.recv(0, TAG_RENDEZVOUS, "the torch.distributed address", timeout_s)
        backend = str(address["backend"])
    check_backend(backend, device, who)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{address['host']}:{address['port']}",
        rank=comm.Get_rank(),
        world_size=comm.Get_size(),
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return backend


class WeightBroadcaster:
    """Broadcast a model's parameters from one rank in coalesced buckets, by position.

    TODO: transition only: the roles and tests/integration/mpi_scripts/weight_sync.py still
    call it; remove it once they use NamedWeightSender / NamedWeightReceiver (below).

    Both sides build the same buckets from the same parameter order (same architecture),
    so each bucket is one `broadcast` of one flat buffer: few large messages instead of
    one per tensor. Receivers copy into their parameters in place.
    """

    def __init__(self, params: list[torch.Tensor], bucket_mb: float, src: int,
                 group: dist.ProcessGroup | None) -> None:
        self.params = params
        self.src = src
        self.group = group
        limit = int(bucket_mb * 1024 * 1024)
        self.buckets: list[list[int]] = []
        current: list[int] = []
        size = 0
        for index, param in enumerate(params):
            nbytes = param.numel() * param.element_size()
            same_dtype = not current or params[current[0]].dtype == param.dtype
            if current and (size + nbytes > limit or not same_dtype):
                self.buckets.append(current)
                current, size = [], 0
            current.append(index)
            size += nbytes
        if current:
            self.buckets.append(current)

    @property
    def num_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.params)

    @torch.no_grad()
    def broadcast(self) -> None:
        rank = dist.get_rank()
        for bucket in self.buckets:
            tensors = [self.params[i].data for i in bucket]
            if rank == self.src:
                flat = _flatten_dense_tensors(tensors)
                dist.broadcast(flat, src=self.src, group=self.group)
            else:
                flat = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype,
                                   device=tensors[0].device)
                dist.broadcast(flat, src=self.src, group=self.group)
                for target, value in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
                    target.copy_(value)


def allreduce_gradients(params: list[torch.Tensor], group: dist.ProcessGroup | None) -> None:
    """Sum gradients over data-parallel trainers in one coalesced all-reduce."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for grad, value in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(value)


def allreduce_metrics(totals: dict[str, float],
                      group: dist.ProcessGroup | None) -> dict[str, float]:
    """Sum a step's loss metrics over data-parallel trainers (one all-reduce, float64).

    Every replica must hold the same keys (the same loss function ran on each)."""
    keys = sorted(totals)
    summed = torch.tensor([totals[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(summed, group=group)
    return dict(zip(keys, summed.tolist()))


# ---------------------------------------------------------------- weight sync by name

# NOTE: the spec is decoded from bytes another process sent: JSON with an allow-list of
# dtypes and checked types, never pickle (a pickle runs code while it loads).
_DTYPES: dict[str, torch.dtype] = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64,
                  torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)
}
SPEC_FORMAT = "hpcalign-weight-spec/1"
MAX_SPEC_BYTES = 64 * 1024 * 1024  # ~100 bytes a tensor: room for ~600k named tensors

NamedTensors = Iterable[tuple[str, torch.Tensor]]
Loader = Callable[[list[tuple[str, torch.Tensor]]], None]


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One sent tensor: its name on the sender, shape and dtype (the receiver's may differ)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True, slots=True)
class Bucket:
    """Tensors sent as one flat buffer: one dtype, `offsets` in elements into the buffer."""

    dtype: torch.dtype
    indices: tuple[int, ...]  # into WeightSpec.tensors, in send order
    offsets: tuple[int, ...]
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True, slots=True)
class WeightSpec:
    """What the sender sends, in order, and the bucket size: all a receiver needs to plan."""

    tensors: tuple[TensorSpec, ...]
    bucket_bytes: int

    @classmethod
    def of(cls, named: Sequence[tuple[str, torch.Tensor]], bucket_bytes: int) -> WeightSpec:
        return cls(tuple(TensorSpec(name, tuple(t.shape), t.dtype) for name, t in named),
                   int(bucket_bytes))

    @property
    def num_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def buckets(self) -> list[Bucket]:
        """Consecutive tensors of one dtype up to `bucket_bytes`; a bigger tensor goes alone.

        A pure function of the spec, so sender and receivers get the same plan without
        exchanging it.
        """
        buckets: list[Bucket] = []
        indices: list[int] = []
        offsets: list[int] = []
        numel = 0

        def close() -> None:
            if indices:
                dtype = self.tensors[indices[0]].dtype
                buckets.append(Bucket(dtype, tuple(indices), tuple(offsets), numel))

        for index, tensor in enumerate(self.tensors):
            if indices and (self.tensors[indices[0]].dtype != tensor.dtype
                            or (numel + tensor.numel) * tensor.dtype.itemsize > self.bucket_bytes):
                close()
                indices, offsets, numel = [], [], 0
            indices.append(index)
            offsets.append(numel)
            numel += tensor.numel
        close()
        return buckets

    def encode(self) -> bytes:
        tensors = [[t.name, list(t.shape), str(t.dtype).removeprefix("torch.")]
                   for t in self.tensors]
        return json.dumps({"format": SPEC_FORMAT, "bucket_bytes": self.bucket_bytes,
                           "tensors": tensors}).encode()

    @classmethod
    def decode(cls, data: bytes) -> WeightSpec:
        """Parse and check a received spec; a malformed one raises ValueError saying what."""
        try:
            message = json.loads(data.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"weight spec is not JSON: {err}") from err
        if not isinstance(message, dict) or message.get("format") != SPEC_FORMAT:
            raise ValueError(f"weight spec is not of format {SPEC_FORMAT!r} (sender and "
                             f"receiver run different hpcalign versions?)")
        bucket_bytes, entries = message.get("bucket_bytes"), message.get("tensors")
        if not isinstance(bucket_bytes, int) or bucket_bytes <= 0:
            raise ValueError(f"weight spec: bucket_bytes={bucket_bytes!r}, expected an int > 0")
        if not isinstance(entries, list):
            raise ValueError("weight spec: 'tensors' is not a list")
        tensors, seen = [], set()
        for entry in entries:
            ok = (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                  and isinstance(entry[1], list) and isinstance(entry[2], str)
                  and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                          for d in entry[1]))
            if not ok or entry[2] not in _DTYPES or entry[0] in seen:
                raise ValueError(f"weight spec: bad or repeated entry {str(entry)[:200]}; "
                                 f"expected [name, [dims >= 0], dtype in {sorted(_DTYPES)}]")
            seen.add(entry[0])
            tensors.append(TensorSpec(entry[0], tuple(entry[1]), _DTYPES[entry[2]]))
        return cls(tuple(tensors), bucket_bytes)


def unique_named_tensors(named: NamedTensors) -> list[tuple[str, torch.Tensor]]:
    """Drop the later names of a tensor already listed (tied embedding and lm_head).

    `named_parameters()` already does; a `state_dict()`-like source lists both names of a
    tied weight, which would send the same bytes twice. Two different tensors under one
    name is an error: a receiver could not tell which one it got.
    """
    result: list[tuple[str, torch.Tensor]] = []
    storages: set[tuple] = set()
    names: set[str] = set()
    for name, tensor in named:
        if name in names:
            raise ValueError(f"weight sync: two tensors are named {name!r}")
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
               tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if key in storages:
            continue
        storages.add(key)
        names.add(name)
        result.append((name, tensor))
    return result


def _broadcast_spec(spec: WeightSpec | None, src: int, group: dist.ProcessGroup | None,
                    device: torch.device) -> WeightSpec:
    """The spec as length-prefixed JSON bytes in uint8 tensors (NCCL moves only tensors)."""
    length = torch.zeros(1, dtype=torch.int64, device=device)
    if spec is not None:
        data = spec.encode()
        length.fill_(len(data))
        dist.broadcast(length, src=src, group=group)
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
        dist.broadcast(payload, src=src, group=group)
        return spec
    dist.broadcast(length, src=src, group=group)
    size = int(length.item())
    if not 0 < size <= MAX_SPEC_BYTES:
        raise ValueError(f"weight spec from rank {src} announces {size} bytes "
                         f"(expected 1..{MAX_SPEC_BYTES}): not an hpcalign weight sender?")
    payload = torch.empty(size, dtype=torch.uint8, device=device)
    dist.broadcast(payload, src=src, group=group)
    return WeightSpec.decode(payload.cpu().numpy().tobytes())


class NamedWeightSender:
    """Send named tensors from rank `src` in coalesced buckets (the trainer side).

    `named` is a list of (name, tensor) or a function returning one, called at every sync
    so an engine can hand over freshly gathered tensors. Its names, shapes and dtypes must
    stay those of the first sync (the spec receivers planned from).
    """

    def __init__(self, named: Callable[[], NamedTensors] | Sequence[tuple[str, torch.Tensor]],
                 bucket_mb: float, src: int = 0, group: dist.ProcessGroup | None = None) -> None:
        self._named = named if callable(named) else (lambda: named)
        self.bucket_bytes = max(1, int(bucket_mb * 1024 * 1024))
        self.src = src
        self.group = group
        self.spec: WeightSpec | None = None
        self._buckets: list[Bucket] = []
        self._staging: list[torch.Tensor] = []  # two reused flat buffers, bytes
        self.copied_bytes = 0  # flattened into staging by the last sync

    def _tensors(self) -> list[torch.Tensor]:
        named = unique_named_tensors(self._named())
        if self.spec is None:
            if not named:
                raise ValueError("weight sync: the sender has no tensors to send")
            self.spec = WeightSpec.of(named, self.bucket_bytes)
            _broadcast_spec(self.spec, self.src, self.group, named[0][1].device)
            self._buckets = self.spec.buckets()
            size = max((b.nbytes for b in self._buckets if len(b.indices) > 1), default=0)
            self._staging = [torch.empty(size, dtype=torch.uint8, device=named[0][1].device)
                             for _ in range(2)]
            return [t for _, t in named]
        if len(named) != len(self.spec.tensors):
            raise ValueError(f"weight sync: the sender now has {len(named)} tensors, "
                             f"{len(self.spec.tensors)} at the first sync")
        for (name, tensor), expected in zip(named, self.spec.tensors):
            if (name, tuple(tensor.shape), tensor.dtype) != (expected.name, expected.shape,
                                                              expected.dtype):
                raise ValueError(f"weight sync: sender tensor {name!r} {tuple(tensor.shape)} "
                                 f"{tensor.dtype} differs from the first sync's "
                                 f"{expected.name!r} {expected.shape} {expected.dtype}")
        return [t for _, t in named]

    @torch.no_grad()
    def sync(self) -> None:
        """Broadcast every tensor once; receivers call `NamedWeightReceiver.sync` meanwhile.

        Returns when every bucket is sent: the caller may then change the tensors.
        """
        tensors = self._tensors()
        self.copied_bytes = _send_buckets(
            self._buckets, lambda bucket: [tensors[i] for i in bucket.indices],
            self._staging, self.src, self.group)


def coalesce_in_place(named: NamedTensors, bucket_mb: float) -> int:
    """Make each weight-sync bucket of `named` one flat buffer that the tensors are views of.

    `NamedWeightSender` then broadcasts such a bucket as it lies, without flattening it
    into its staging buffer: Megatron's contiguous parameter buffers, for the sync. The
    tensors (parameters: their `.data` is rebound) keep their values, objects and
    gradients; an optimizer built before or after sees the same parameters. Call it with
    the sender's own `named` and `bucket_mb`, before the first sync and before anything
    keeps a raw pointer (a CUDA graph). Memory stays the model's plus one bucket while it
    runs. Returns the number of bytes now laid out per bucket.
    """
    tensors = unique_named_tensors(named)
    if not tensors:
        return 0
    spec = WeightSpec.of(tensors, max(1, int(bucket_mb * 1024 * 1024)))
    laid_out = 0
    with torch.no_grad():
        for bucket in spec.buckets():
            parts = [tensors[i][1] for i in bucket.indices]
            if (len(parts) < 2 or len({p.device for p in parts}) > 1
                    or _back_to_back(parts) is not None):
                continue  # a lone tensor is sent as it lies anyway
            flat = torch.empty(bucket.numel, dtype=bucket.dtype, device=parts[0].device)
            for part, offset in zip(parts, bucket.offsets):
                view = flat[offset:offset + part.numel()].view(part.shape)
                view.copy_(part)
                part.data = view
            laid_out += bucket.nbytes
    return laid_out


def _back_to_back(parts: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """One flat view over `parts` if they lie contiguously, in order, in one storage."""
    first = parts[0]
    storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for part in parts:
        if (not part.is_contiguous() or part.dtype != first.dtype
                or part.device != first.device
                or part.untyped_storage().data_ptr() != storage
                or part.storage_offset() != offset):
            return None
        offset += part.numel()
    return first.as_strided((offset - first.storage_offset(),), (1,), first.storage_offset())


def _send_buckets(buckets: Sequence[Bucket], parts_of: Callable[[Bucket], list[torch.Tensor]],
                  staging: list[torch.Tensor], src: int, group: dist.ProcessGroup | None) -> int:
    """Broadcast each bucket's tensors (`parts_of(bucket)`, asked for in bucket order) as
    one flat buffer, two buckets in flight. Returns the bytes copied into staging (0 when
    every bucket lies flat already: `coalesce_in_place`)."""
    # NOTE: two staging buffers, so bucket k+1 is flattened while bucket k is on the
    # wire (async broadcast): on a 2-core CPU machine this took the named sync from
    # 1.5-2.1x a raw broadcast of the same buckets to 1.03-1.2x with 6 or more
    # buckets (docs/benchmarks.md); the first bucket's flatten stays exposed.
    # With NCCL, wait() orders the current stream after the broadcast, so the copy
    # into a reused buffer cannot overtake it. `held` keeps a lone tensor sent as is
    # alive until its broadcast is done (a streamed one has no other owner).
    works: list[dist.Work | None] = [None, None]
    held: list[torch.Tensor | None] = [None, None]
    copied = 0
    for k, bucket in enumerate(buckets):
        parts = [tensor.detach() for tensor in parts_of(bucket)]
        if not bucket.numel:
            continue
        slot = k % 2
        if works[slot] is not None:
            works[slot].wait()  # that buffer's previous bucket has left
        flat = _back_to_back(parts)  # a lone tensor, or a coalesced bucket: no copy
        if flat is None:
            flat = staging[slot][:bucket.nbytes].view(bucket.dtype)
            torch.cat([p.reshape(-1) for p in parts], out=flat)
            copied += bucket.nbytes
        held[slot] = flat
        works[slot] = dist.broadcast(flat, src=src, group=group, async_op=True)
    for work in works:
        if work is not None:
            work.wait()
    return copied


class StreamedWeightSender:
    """Send named tensors that are produced one after another (the trainer side of a
    sharded engine): the spec is known before any tensor exists, and each tensor needs
    to live only until its bucket is on the wire.

    `spec` lists (name, shape, dtype) in send order; `stream()` yields (name, tensor) in
    exactly that order, once per sync (a generator that gathers the next layer when asked).
    Receivers are `NamedWeightReceiver`s: the wire format (spec, then the spec's buckets)
    is `NamedWeightSender`'s.

        sender = StreamedWeightSender(engine.hf_weight_spec(), engine.hf_weight_stream,
                                      bucket_mb=64, src=0, group=g)
        sender.sync()
    """

    def __init__(self, spec: Sequence[tuple[str, Sequence[int], torch.dtype]],
                 stream: Callable[[], Iterable[tuple[str, torch.Tensor]]], bucket_mb: float,
                 src: int = 0, group: dist.ProcessGroup | None = None,
                 device: torch.device | str = "cpu") -> None:
        if not spec:
            raise ValueError("weight sync: the sender has no tensors to send")
        self.spec = WeightSpec(tuple(TensorSpec(name, tuple(int(d) for d in shape), dtype)
                                     for name, shape, dtype in spec),
                               max(1, int(bucket_mb * 1024 * 1024)))
        self._stream = stream
        self.src = src
        self.group = group
        self.device = torch.device(device)
        self._buckets = self.spec.buckets()
        self._sent_spec = False
        self.copied_bytes = 0  # flattened into staging by the last sync
        size = max((b.nbytes for b in self._buckets if len(b.indices) > 1), default=0)
        self._staging = [torch.empty(size, dtype=torch.uint8, device=self.device)
                         for _ in range(2)]

    @torch.no_grad()
    def sync(self) -> None:
        """Broadcast one version (the spec first, at the first sync); collective with the
        receivers, and with whatever ranks `stream` gathers from."""
        if not self._sent_spec:
            _broadcast_spec(self.spec, self.src, self.group, self.device)
            self._sent_spec = True
        stream = iter(self._stream())
        specs = self.spec.tensors

        def parts_of(bucket: Bucket) -> list[torch.Tensor]:
            parts = []
            for index in bucket.indices:
                expected = specs[index]
                name, tensor = next(stream, (None, None))
                if tensor is None or (name, tuple(tensor.shape), tensor.dtype) != (
                        expected.name, expected.shape, expected.dtype):
                    got = "nothing" if tensor is None else \
                        f"{name!r} {tuple(tensor.shape)} {tensor.dtype}"
                    raise ValueError(f"weight sync: the stream gave {got} where the spec has "
                                     f"{expected.name!r} {expected.shape} {expected.dtype}")
                parts.append(tensor)
            return parts

        self.copied_bytes = _send_buckets(self._buckets, parts_of, self._staging, self.src,
                                          self.group)
        extra = next(stream, None)
        if extra is not None:
            raise ValueError(f"weight sync: the stream gave {extra[0]!r} after the "
                             f"{len(specs)} tensors of the spec")


class NamedWeightReceiver:
    """Receive what a NamedWeightSender sends and hand it to `load`, bucket by bucket.

    `load` gets [(name, tensor), ...] per bucket: views into one reused receive buffer,
    valid only during the call, so a loader copies (and casts) them into its weights. If
    `load` has a `check_spec(spec)` method (`load_into_module`'s has), it runs once when
    the spec arrives, before any bucket, so a layout mismatch fails naming every bad name
    at once. If it has `bind(spec, buckets, device)` (`load_into_module`'s has), the
    buffers it returns are the weights themselves: those buckets are received in place,
    with no load. The bucket size is the sender's: it travels in the spec.
    """

    def __init__(self, load: Loader, src: int = 0, group: dist.ProcessGroup | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.load = load
        self.src = src
        self.group = group
        self.device = torch.device(device)
        self.spec: WeightSpec | None = None
        self._buckets: list[Bucket] = []
        self._buffers: list[torch.Tensor] = []  # two reused receive buffers, bytes
        self._bound: list[torch.Tensor | None] = []  # per bucket: the weights themselves
        self.copied_bytes = 0  # handed to `load` by the last sync

    @torch.no_grad()
    def sync(self) -> None:
        """Receive one version of the weights and load it (collective with the sender)."""
        if self.spec is None:
            self.spec = _broadcast_spec(None, self.src, self.group, self.device)
            check = getattr(self.load, "check_spec", None)
            if check is not None:
                check(self.spec)
            self._buckets = self.spec.buckets()
            bind = getattr(self.load, "bind", None)
            self._bound = (bind(self.spec, self._buckets, self.device) if bind is not None
                           else [None] * len(self._buckets))
            size = max((b.nbytes for b, flat in zip(self._buckets, self._bound)
                        if flat is None), default=0)
            self._buffers = [torch.empty(size, dtype=torch.uint8, device=self.device)
                             for _ in range(2)]
        specs = self.spec.tensors
        self.copied_bytes = 0

        def post(k: int) -> tuple[torch.Tensor, dist.Work | None]:
            bucket, bound = self._buckets[k], self._bound[k]
            flat = bound if bound is not None else \
                self._buffers[k % 2][:bucket.nbytes].view(bucket.dtype)
            if not bucket.numel:
                return flat, None
            return flat, dist.broadcast(flat, src=self.src, group=self.group, async_op=True)

        # NOTE: two buckets in flight, as on the sender (its note says why and what it
        # gained): bucket k+1 is posted into the other buffer, whose bucket k-1 is loaded
        # already, before waiting for bucket k, so the sender never waits for a posted
        # receive. The cost is a second buffer the size of the largest bucket.
        pending = post(0) if self._buckets else None
        for k, bucket in enumerate(self._buckets):
            assert pending is not None
            flat, work = pending
            pending = post(k + 1) if k + 1 < len(self._buckets) else None
            if work is not None:
                work.wait()
            if self._bound[k] is None:
                self.load([(specs[i].name,
                            flat[offset:offset + specs[i].numel].view(specs[i].shape))
                           for i, offset in zip(bucket.indices, bucket.offsets)])
                self.copied_bytes += bucket.nbytes


class ModuleLoader:
    """Copy named tensors into a module's parameters and buffers by name, casting dtype.

    Accepts every name a parameter has (a tied weight's second name too); `rename` maps a
    sender's name to this module's (None: skip that tensor), for engines whose names
    differ (a DDP "module." prefix, megatron's layout).
    """

    def __init__(self, module: torch.nn.Module,
                 rename: Callable[[str], str | None] | None = None) -> None:
        self.rename = rename
        self.targets: dict[str, torch.Tensor] = dict(module.named_buffers(remove_duplicate=False))
        self.targets.update(module.named_parameters(remove_duplicate=False))
        self.required = dict(module.named_parameters())  # buffers are optional

    def _target(self, name: str) -> tuple[str | None, torch.Tensor | None]:
        key = name if self.rename is None else self.rename(name)
        return key, (None if key is None else self.targets.get(key))

    def check_spec(self, spec: WeightSpec) -> None:
        """Raise ValueError naming every missing, unexpected and mismatched tensor."""
        unexpected, mismatched, loaded = [], [], set()
        for sent in spec.tensors:
            key, target = self._target(sent.name)
            label = sent.name if key == sent.name else f"{sent.name} (as {key})"
            if key is None:
                continue
            if target is None:
                unexpected.append(label)
            elif (tuple(target.shape) != sent.shape
                  or target.dtype.is_floating_point != sent.dtype.is_floating_point):
                mismatched.append(f"{label}: sent {sent.shape} {sent.dtype}, model has "
                                  f"{tuple(target.shape)} {target.dtype}")
            else:
                loaded.add(id(target))
        missing = [name for name, param in self.required.items() if id(param) not in loaded]
        if missing or unexpected or mismatched:
            parts = [f"{what} ({len(names)}): {', '.join(names[:10])}"
                     + (", ..." if len(names) > 10 else "")
                     for what, names in (("missing (the model has them, the sender does not "
                                          "send them)", missing),
                                         ("unexpected (sent, not in the model)", unexpected),
                                         ("shape or kind mismatch", mismatched)) if names]
            raise ValueError("weight sync: the sent weights do not fit this model: "
                             + "; ".join(parts))

    @torch.no_grad()
    def bind(self, spec: WeightSpec, buckets: Sequence[Bucket],
             device: torch.device) -> list[torch.Tensor | None]:
        """Per bucket, a flat buffer on `device` that the bucket's parameters become views
        of (their values copied in first), or None where the bucket cannot be received in
        place: a name renamed away or not a parameter, a dtype or shape that differs (a
        bf16 generator of an fp32 trainer casts in `__call__`), another device.

        The receiver then broadcasts straight into the model: no receive buffer, no copy.
        Only for a model nothing reads while a sync runs (the generator role samples and
        syncs in turn); buckets bound by an earlier receiver are bound afresh.
        """
        parameters = {id(param) for param in self.required.values()}
        taken: set[int] = set()
        bound: list[torch.Tensor | None] = []
        for bucket in buckets:
            targets = [self._target(spec.tensors[i].name)[1] for i in bucket.indices]
            if not bucket.numel or len({id(t) for t in targets}) != len(targets) or not all(
                    target is not None and id(target) in parameters and id(target) not in taken
                    and target.dtype == sent.dtype and tuple(target.shape) == sent.shape
                    and target.device == device
                    for target, sent in zip(targets, (spec.tensors[i] for i in bucket.indices))):
                bound.append(None)
                continue
            flat = torch.empty(bucket.numel, dtype=bucket.dtype, device=device)
            for target, offset in zip(targets, bucket.offsets):
                view = flat[offset:offset + target.numel()].view(target.shape)
                view.copy_(target)
                target.data = view
                taken.add(id(target))
            bound.append(flat)
        return bound

    @torch.no_grad()
    def __call__(self, named: list[tuple[str, torch.Tensor]]) -> None:
        for name, value in named:
            key, target = self._target(name)
            if key is None:
                continue
            if target is None or target.shape != value.shape:
                raise ValueError(f"weight sync: cannot load {name!r} {tuple(value.shape)} "
                                 f"into this model (" + ("no such tensor" if target is None
                                 else f"it has shape {tuple(target.shape)}") + ")")
            target.copy_(value)


def load_into_module(module: torch.nn.Module,
                     rename: Callable[[str], str | None] | None = None) -> ModuleLoader:
    """A loader for NamedWeightReceiver that copies into `module` in place, by name."""
    return ModuleLoader(module, rename)
