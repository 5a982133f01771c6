"""Rollout shards: one HDF5 file per (step, generator rank) on the shared filesystem.

A generator rank writes the samples it produced for one step with `write_shard`, then
announces `(path, size_bytes, checksum, policy_version)` to the trainer over MPI; the
trainer opens that exact path with `read_shard`. Files carry the data, MPI carries control
(see `shared/FACTS.md`, "HDF5 shards on a shared filesystem").

Why the care: a shard lives on NFS or Lustre and is read on another node. A reader must
never see a half-written file (write to a temp name, fsync, atomic rename, fsync the
directory), must not depend on file locks (NFS/Lustre flock is missing or slow), and must
refuse — loudly, naming the file — anything truncated, corrupted or of another format
version. Every such failure raises `hpcalign.errors.ShardError`.

The on-disk format is documented and versioned in `docs/shard-format.md`; change both
together and bump `SHARD_FORMAT_VERSION` when the layout changes.

No byte reaches HDF5 unverified: the HDF5 C library does not promise to survive corrupted
metadata (a 64-byte flip in its global heap makes it loop forever), so `read_shard` hashes
the whole file first and compares with a checksum it trusts — the one announced over MPI,
or the writer's JSON sidecar `shard-0003.json` next to `shard-0003.h5` — and parses the
very bytes it hashed. A file with no trusted checksum (a foreign file, an old run) is
parsed first in a child process with a time bound, and a hang is reported as corruption.

    from hpcalign.data.shards import shard_path, write_shard, read_shard
    info = write_shard(shard_path(run_dir, step, rank), batch)  # also writes the sidecar
    batch = read_shard(info.path, expected_file_checksum=info.file_checksum,
                       expected_checksum=info.checksum)
    batch = read_shard(shard_path(run_dir, step, rank))  # later: verified by the sidecar
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import h5py
import numpy as np
import numpy.typing as npt
import xxhash

from hpcalign.durable import atomic_write_text, remove_stale_temps
from hpcalign.errors import ShardError

SHARD_FORMAT = "hpcalign-rollout"
SHARD_FORMAT_VERSION = 2  # the newest; a batch without per-function rewards is written as 1
READABLE_VERSIONS = (1, 2)

# Uncompressed datasets are contiguous: readers always read a dataset whole, and against
# 4 MiB chunks contiguous writes 0.79 vs 0.72 x dd and reads 0.86 vs 0.66 x dd
# (tools/bench/shard_io.py --chunk-mb 0 / 4, alternated; docs/benchmarks.md). Compression
# needs chunks: datasets are then split into equal chunks of at most COMPRESSED_CHUNK_BYTES.
# CHUNK_BYTES > 0 forces chunks of at most that size for uncompressed data too (benchmarks).
CHUNK_BYTES = 0
COMPRESSED_CHUNK_BYTES = 4 << 20

# The checksum hashes datasets in pieces of this size, on up to HASH_THREADS threads.
# NOTE: part of the checksum definition: changing HASH_PIECE_BYTES is a format version bump.
HASH_PIECE_BYTES = 4 << 20
HASH_THREADS = 8

# A file without a trusted whole-file checksum is parsed first in a child process, killed
# after this many seconds (interpreter start, ~0.2 s, included): a hang means corruption.
PARSE_TIMEOUT_S = 10.0
# The sidecar is ~150 bytes; anything much larger is not one (and is not read whole).
_SIDECAR_MAX_BYTES = 4096
_SIDECAR_KEYS = ("file_checksum", "size_bytes", "format_version", "checksum")
# `RUN_DIR/rollouts/step-000042/shard-0003.h5`: a file there must hold that step and rank.
_RUN_SHARD_PATH = re.compile(r"/rollouts/step-(\d{6,})/shard-(\d{4,})\.h5$")

# In memory, token ids are int32 (what torch indexes with; no vocabulary is near 2**31).
# On disk: uint16 when every id in the shard fits (vocab <= 65536, half the bytes), else
# int32 like in memory. NOTE: not uint32: that would cost a conversion copy on both write
# and read for nothing, since ids >= 2**31 are refused anyway.
TOKEN_DTYPE = np.dtype(np.int32)
_DISK_TOKEN_DTYPES = (np.dtype("<u2"), np.dtype("<i4"))

# (name, on-disk dtype or None for "one of _DISK_TOKEN_DTYPES", length: "N", "N+1", "P", "C").
# NOTE: this order is the checksum order; changing it is a format version bump.
_DATASETS: tuple[tuple[str, np.dtype | None, str], ...] = (
    ("prompt_ids", np.dtype("<i8"), "N"),
    ("prompt_offsets", np.dtype("<i8"), "N+1"),
    ("prompt_tokens", None, "P"),
    ("completion_offsets", np.dtype("<i8"), "N+1"),
    ("completion_tokens", None, "C"),
    ("logprobs", np.dtype("<f4"), "C"),
    ("rewards", np.dtype("<f4"), "N"),
    ("seeds", np.dtype("<i8"), "N"),
    ("finished", np.dtype("u1"), "N"),
)
# Version 2 adds the per-function rewards: the names as a JSON list, the values [N x F].
_REWARD_DATASET = ("reward_values", np.dtype("<f4"), "N*F")
_INT_ATTRS = ("step", "policy_version", "generator_rank", "num_samples")
# Attributes covered by the checksum, in checksum order.
_CHECKSUM_ATTRS = ("format", "format_version", *_INT_ATTRS, "attrs_json")
_CHECKSUM_ATTRS_V2 = (*_CHECKSUM_ATTRS, "reward_names_json")


def _datasets(version: int) -> tuple[tuple[str, np.dtype | None, str], ...]:
    """The datasets of a format version, in checksum order."""
    return _DATASETS if version == 1 else (*_DATASETS, _REWARD_DATASET)
_CHECKSUM_ALGORITHM = "xxh3-128"


@dataclass
class Ragged:
    """Ragged sequences as one flat array plus int64 offsets (len N+1, offsets[0] == 0).

    Sequence i is `flat[offsets[i]:offsets[i+1]]`. This is the on-disk layout too: one
    contiguous dataset per field instead of N small ones, so I/O is a few large reads.
    """

    flat: np.ndarray
    offsets: np.ndarray

    def __post_init__(self) -> None:
        self.flat = np.asarray(self.flat)
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        if self.flat.ndim != 1:
            raise ValueError(f"Ragged: flat must be 1-D, got shape {self.flat.shape}")
        problem = _offsets_problem(self.offsets, len(self.flat))
        if problem:
            raise ValueError(f"Ragged: {problem}")

    @classmethod
    def from_list(
        cls, seqs: Sequence[Sequence[int | float]] | Sequence[np.ndarray], dtype: npt.DTypeLike
    ) -> Ragged:
        arrays = [np.asarray(s, dtype=dtype).reshape(-1) for s in seqs]
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum([len(a) for a in arrays], out=offsets[1:])
        flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)
        return cls(flat=flat.astype(dtype, copy=False), offsets=offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"Ragged index {i} out of range for {n} sequences")
        i %= n
        return self.flat[self.offsets[i] : self.offsets[i + 1]]

    def to_list(self) -> list[np.ndarray]:
        return [self[i] for i in range(len(self))]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


@dataclass
class RolloutBatch:
    """N samples produced by one generator rank for one step.

    Tokens are int32 in memory (uint16 or int32 on disk, see `docs/shard-format.md`).
    `logprobs` are the generator's per-token log-probs, aligned 1:1 with
    `completion_tokens` (same offsets).
    """

    step: int
    policy_version: int
    generator_rank: int
    prompt_ids: np.ndarray  # int64 [N], index of the prompt in the task (a group shares it)
    prompt_tokens: Ragged  # int32 token ids, N sequences
    completion_tokens: Ragged  # int32 token ids, N sequences
    logprobs: Ragged  # float32, same offsets as completion_tokens
    rewards: np.ndarray  # float32 [N]
    seeds: np.ndarray  # int64 [N], sampling seed of each sample
    finished: np.ndarray  # bool [N], ended with EOS
    attrs: dict[str, str | int | float] = field(default_factory=dict)  # task, model, timings
    reward_names: tuple[str, ...] = ()  # the reward functions, in `reward_values` column order
    # float32 [N, F]: each function's value per sample, NaN where it did not apply (None)
    reward_values: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.prompt_ids)


@dataclass(frozen=True)
class ShardInfo:
    """What a writer announces over MPI: enough for the reader to open and verify."""

    path: str
    size_bytes: int
    checksum: str  # the content checksum (the `checksum` attribute): data and key attributes
    # XXH3-128 of the file's bytes: what a reader checks BEFORE handing the file to HDF5
    file_checksum: str


def shard_path(run_dir: str, step: int, generator_rank: int) -> str:
    """`RUN_DIR/rollouts/step-000042/shard-0003.h5`: one directory per step, one file per rank."""
    return os.path.join(run_dir, "rollouts", f"step-{step:06d}", f"shard-{generator_rank:04d}.h5")


# ---------------------------------------------------------------------------------------
# writing


def write_shard(path: str, batch: RolloutBatch, *, compression: str | None = None) -> ShardInfo:
    """Write `batch` to `path` atomically and durably, with its sidecar (`shard-0003.json`:
    the whole-file checksum); return what the reader needs. Announce the shard only after
    this returns: both files are durable by then.

    `compression` is None (default, fastest), "lzf" or "gzip" (level 1). Raises ValueError
    for an inconsistent batch (a bug in the caller, not a bad file).
    """
    if compression not in (None, "lzf", "gzip"):
        raise ValueError(f"compression must be None, 'lzf' or 'gzip', got {compression!r}")
    arrays = _batch_to_arrays(batch)
    attrs = _key_attrs(batch)

    directory = os.path.dirname(os.path.abspath(path))
    _makedirs_private(directory)
    # NOTE: the temp name is in the same directory (rename is atomic only within one
    # directory / filesystem) and starts with "." so nothing globbing "shard-*.h5" sees it.
    tmp = os.path.join(
        directory, f".{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    )
    info: ShardInfo | None = None
    try:
        # NOTE: locking=False: flock on NFS/Lustre is missing or slow, and nobody else can
        # know the temp name anyway. libver v110 writes checksummed metadata (superblock v3,
        # object header v2), so a flipped byte in the metadata fails on open as well.
        with (_hash_pool() as pool, h5py.File(tmp, "w", locking=False, libver="v110") as f,
              _Writeback(tmp) as writeback):
            checksum = _Checksum(attrs, pool)
            for name, value in attrs.items():
                f.attrs[name] = value
            for name, data in arrays.items():
                checksum.add(name, data)
                f.create_dataset(name, data=data, **_layout(data, compression))
                writeback.start(data.nbytes)
            f.attrs["checksum"] = digest = checksum.hexdigest()
            f.flush()
        # NOTE: fsync after close: HDF5 writes metadata on close, and the rename below must
        # not become durable (or visible on another node) before the data it points at.
        # While another thread waits for that fsync, this one hashes the file as written
        # (from the page cache) and writes the sidecar: both hide behind the fsync.
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fchmod(fd, 0o600)  # like every RUN_DIR file: the samples are the user's own
            with _BackgroundFsync(fd):
                info = ShardInfo(path=path, size_bytes=os.fstat(fd).st_size, checksum=digest,
                                 file_checksum=_file_digest(fd))
                # NOTE: the sidecar goes first: it names what the path must hold, so
                # during a rewrite the old file is refused, never vouched for.
                _write_sidecar(info, int(attrs["format_version"]))
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        if info is not None:  # this attempt's sidecar, naming a file that is not there
            _remove_quietly(sidecar_path(path))
        raise
    _remove_stale_temps(directory, os.path.basename(path))
    _fsync_dir(directory)
    return info


class _BackgroundFsync:
    """`fsync(fd)` on another thread for the duration of a `with` block (fsync and xxhash
    release the GIL); its error, if any, is raised on exit."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._sync, name="shard-fsync")

    def _sync(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as err:
            self._error = err

    def __enter__(self) -> _BackgroundFsync:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        self._thread.join()
        if self._error is not None and exc_type is None:
            raise self._error


def _file_digest(fd: int) -> str:
    """XXH3-128 hex digest of the whole file `fd` (the file checksum of docs/shard-format.md).

    NOTE: through an mmap of the page cache, no copy (~19 GB/s here, vs ~5 GB/s reading
    it into a buffer): the writer hashes the bytes as written without a second read.
    """
    size = os.fstat(fd).st_size
    if size == 0:
        return xxhash.xxh3_128(b"").hexdigest()
    with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as view:
        return xxhash.xxh3_128(view).hexdigest()


def sidecar_path(path: str) -> str:
    """`step-000042/shard-0003.json` for `step-000042/shard-0003.h5`: the writer's record."""
    root, ext = os.path.splitext(path)
    return (root if ext == ".h5" else path) + ".json"


def _write_sidecar(info: ShardInfo, format_version: int) -> None:
    """Record the shard's whole-file checksum where a later reader finds it without
    trusting the shard (a resumed trainer, `hpcalign inspect`): atomic and durable."""
    record = {"file_checksum": info.file_checksum, "size_bytes": info.size_bytes,
              "format_version": format_version, "checksum": info.checksum}
    sidecar = sidecar_path(info.path)
    atomic_write_text(sidecar, json.dumps(record) + "\n")
    remove_stale_temps(os.path.dirname(sidecar), os.path.basename(sidecar))


def trusted_checksum(path: str) -> str | None:
    """The whole-file checksum the writer recorded for the shard `path`, None without a
    sidecar. A sidecar that is not one (unreadable, not the JSON the writer writes) raises
    ShardError naming the sidecar: it is never half-trusted."""
    record = _read_sidecar(path)
    return None if record is None else str(record["file_checksum"])


def _read_sidecar(path: str) -> dict[str, str | int] | None:
    """The checked sidecar of `path`, or None where there is none.

    NOTE: only a few KiB are read and handed to Python's JSON parser, which cannot hang;
    every field is checked, so a corrupted sidecar fails here by name, not later as a
    "checksum mismatch" of a good shard.
    """
    sidecar = sidecar_path(path)
    try:
        with open(sidecar, "rb") as handle:
            raw = handle.read(_SIDECAR_MAX_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise ShardError(sidecar, f"cannot read the shard's sidecar ({err.strerror or err})") from None
    try:
        if len(raw) > _SIDECAR_MAX_BYTES:
            raise ValueError(f"more than {_SIDECAR_MAX_BYTES} bytes")
        record = json.loads(raw.decode("utf-8"))
        if not isinstance(record, dict) or not set(_SIDECAR_KEYS) <= set(record):
            raise ValueError(f"not a JSON object with keys {', '.join(_SIDECAR_KEYS)}")
        for key in ("file_checksum", "checksum"):
            if not isinstance(record[key], str) or not re.fullmatch(r"[0-9a-f]{32}", record[key]):
                raise ValueError(f"{key} is not 32 lowercase hex digits ({record[key]!r:.60})")
        for key in ("size_bytes", "format_version"):
            if type(record[key]) is not int or record[key] < 0:
                raise ValueError(f"{key} is not a non-negative integer ({record[key]!r:.60})")
    except (ValueError, RecursionError) as err:
        raise ShardError(sidecar, f"corrupted shard sidecar, not trusted ({err}); delete it "
                                  "to have the shard checked by a bounded parse") from None
    return record


class _Writeback:
    """Start the disk writeback of a file's dirty pages while later datasets are written.

    `sync_file_range(SYNC_FILE_RANGE_WRITE)` (Linux) queues the pages written so far and
    returns at once, so the device works while the next dataset is copied into the page
    cache and the final fsync has less left to wait for. Durability still comes from that
    fsync; where the call is missing (not Linux) this does nothing.
    """

    _MIN_BYTES = 1 << 20  # not worth a system call for the small per-sample datasets
    _SYNC_FILE_RANGE_WRITE = 2

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDONLY) if _sync_file_range is not None else -1

    def start(self, nbytes: int) -> None:
        if self._fd >= 0 and nbytes >= self._MIN_BYTES:
            _sync_file_range(self._fd, 0, 0, self._SYNC_FILE_RANGE_WRITE)

    def __enter__(self) -> _Writeback:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _load_sync_file_range():
    """libc's sync_file_range(fd, offset, nbytes, flags), or None where there is none."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()


def _batch_to_arrays(batch: RolloutBatch) -> dict[str, np.ndarray]:
    """Check `batch` and convert it to the on-disk arrays, in `_DATASETS` order."""
    n = len(batch)
    per_sample = {
        "prompt_ids": batch.prompt_ids,
        "rewards": batch.rewards,
        "seeds": batch.seeds,
        "finished": batch.finished,
    }
    for name, value in per_sample.items():
        if np.ndim(value) != 1 or len(value) != n:
            raise ValueError(f"{name} must have shape [{n}], got {np.shape(value)}")
    names = tuple(batch.reward_names)
    values = np.zeros((n, 0), np.float32) if batch.reward_values is None else batch.reward_values
    if np.ndim(values) != 2 or np.shape(values) != (n, len(names)):
        raise ValueError(f"reward_values must have shape [{n}, {len(names)}] (samples x "
                         f"reward_names), got {np.shape(values)}")
    if len(set(names)) != len(names) or not all(isinstance(x, str) and x for x in names):
        raise ValueError(f"reward_names must be distinct non-empty strings, got {names!r}")
    for name in ("prompt_tokens", "completion_tokens", "logprobs"):
        if len(getattr(batch, name)) != n:
            raise ValueError(f"{name} holds {len(getattr(batch, name))} sequences, expected {n}")
    if not np.array_equal(batch.logprobs.offsets, batch.completion_tokens.offsets):
        raise ValueError("logprobs must be aligned 1:1 with completion_tokens (same offsets)")
    tokens = (batch.prompt_tokens.flat, batch.completion_tokens.flat)
    token_dtype = _disk_token_dtype(*tokens)
    arrays = {
        "prompt_ids": np.asarray(batch.prompt_ids, dtype="<i8"),
        "prompt_offsets": np.asarray(batch.prompt_tokens.offsets, dtype="<i8"),
        "prompt_tokens": np.asarray(tokens[0], dtype=token_dtype),
        "completion_offsets": np.asarray(batch.completion_tokens.offsets, dtype="<i8"),
        "completion_tokens": np.asarray(tokens[1], dtype=token_dtype),
        "logprobs": np.asarray(batch.logprobs.flat, dtype="<f4"),
        "rewards": np.asarray(batch.rewards, dtype="<f4"),
        "seeds": np.asarray(batch.seeds, dtype="<i8"),
        "finished": np.asarray(batch.finished, dtype=bool).astype("u1"),
        "reward_values": np.asarray(values, dtype="<f4").reshape(-1),  # row-major: sample i's F
    }
    return {name: np.ascontiguousarray(arrays[name])
            for name, _, _ in _datasets(_version(batch))}


def _version(batch: RolloutBatch) -> int:
    """The oldest format version that holds `batch` (1 unless it has per-function rewards)."""
    return 2 if batch.reward_names else 1


def _disk_token_dtype(*token_arrays: np.ndarray) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else int32; ids must be in [0, 2**31)."""
    lo, hi = 0, 0
    for a in token_arrays:
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"token ids must be integers, got dtype {a.dtype}")
        if len(a):
            lo, hi = min(lo, int(a.min())), max(hi, int(a.max()))
    if lo < 0 or hi > np.iinfo(TOKEN_DTYPE).max:
        raise ValueError(f"token ids must be in [0, 2**31), got range [{lo}, {hi}]")
    return _DISK_TOKEN_DTYPES[0] if hi <= np.iinfo(np.uint16).max else _DISK_TOKEN_DTYPES[1]


def _key_attrs(batch: RolloutBatch) -> dict[str, str | int]:
    """The attributes the checksum covers, in checksum order."""
    for key, value in batch.attrs.items():
        if not isinstance(key, str) or not isinstance(value, str | int | float):
            raise ValueError(f"attrs must map str to str/int/float, got {key!r}: {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"attrs[{key!r}] = {value} is not finite (not valid JSON)")
    attrs: dict[str, str | int] = {
        "format": SHARD_FORMAT,
        "format_version": _version(batch),
        "step": int(batch.step),
        "policy_version": int(batch.policy_version),
        "generator_rank": int(batch.generator_rank),
        "num_samples": len(batch),
        "attrs_json": json.dumps(batch.attrs, sort_keys=True, allow_nan=False),
    }
    if attrs["format_version"] == 2:
        attrs["reward_names_json"] = json.dumps(list(batch.reward_names))
    return attrs


def _layout(data: np.ndarray, compression: str | None) -> dict:
    """Chunking and filter arguments for `create_dataset`."""
    if len(data) == 0 or (compression is None and CHUNK_BYTES == 0):
        return {}  # contiguous (an empty dataset cannot be chunked)
    # NOTE: HDF5 stores a partial last chunk at full size, so split the dataset into
    # equal chunks of at most CHUNK_BYTES instead of CHUNK_BYTES plus a padded remainder
    # (a 5 MiB dataset would take 8 MiB of disk with plain 4 MiB chunks).
    max_rows = max(1, (CHUNK_BYTES or COMPRESSED_CHUNK_BYTES) // data.dtype.itemsize)
    num_chunks = -(-len(data) // max_rows)
    layout: dict = {"chunks": (-(-len(data) // num_chunks),)}
    if compression == "gzip":
        layout.update(compression="gzip", compression_opts=1, shuffle=True)
    elif compression == "lzf":
        layout.update(compression="lzf", shuffle=True)
    return layout


def _makedirs_private(directory: str) -> None:
    """Create `directory` and missing parents with mode 0700, fsyncing each new entry."""
    if os.path.isdir(directory):
        return
    parent = os.path.dirname(directory)
    if parent != directory:
        _makedirs_private(parent)
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        return  # another rank made it first
    _fsync_dir(parent)


def _remove_stale_temps(directory: str, name: str) -> None:
    """Delete temp files of earlier attempts at `name` (writers killed mid-write).

    NOTE: each shard path has one writer (a generator rank, or one offline-rollout task),
    so once this attempt's rename is done every other `.<name>.tmp-*` is a dead one's.
    """
    prefix = f".{name}.tmp-"
    for entry in os.listdir(directory):
        if entry.startswith(prefix):
            _remove_quietly(os.path.join(directory, entry))


def _fsync_dir(directory: str) -> None:
    """Make a rename or mkdir in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        # NOTE: some filesystems (and FUSE mounts) refuse fsync on a directory; the rename
        # is still atomic there, only its durability across a server crash is weaker.
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------------------------
# checksum


class _Checksum:
    """XXH3-128 over the key attributes, then every dataset: its name, dtype and length,
    and the XXH3-128 digest of each `HASH_PIECE_BYTES` piece of its bytes.

    The exact byte sequence is defined in `docs/shard-format.md`. Datasets must be added in
    `_DATASETS` order.

    NOTE: pieces are hashed on worker threads while the caller's thread does the HDF5 I/O;
    xxhash and h5py both release the GIL, so hashing and I/O overlap. The checksum guards
    against corruption and truncation, not against an adversary (shards come from our own
    generators): XXH3 hashes ~27 GB/s a core, where BLAKE2b's ~1.4 GB/s halved write
    throughput on a 2-core machine (tools/bench/shard_io.py; docs/benchmarks.md).
    """

    def __init__(self, attrs: dict[str, str | int], pool: ThreadPoolExecutor) -> None:
        self._pool = pool
        self._parts: list[bytes | Future] = []
        keys = _CHECKSUM_ATTRS if attrs["format_version"] == 1 else _CHECKSUM_ATTRS_V2
        header = json.dumps({k: attrs[k] for k in keys}, separators=(",", ":"))
        self._parts.append(header.encode() + b"\n")

    def add(self, name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False))
        self._parts.append(f"{name}:{array.dtype.str}:{len(array)}\n".encode())
        data = memoryview(array).cast("B")
        for start in range(0, len(data), HASH_PIECE_BYTES):
            piece = data[start : start + HASH_PIECE_BYTES]
            self._parts.append(self._pool.submit(_piece_digest, piece))

    def hexdigest(self) -> str:
        outer = xxhash.xxh3_128()
        for part in self._parts:
            outer.update(part if isinstance(part, bytes) else part.result())
        return outer.hexdigest()


def _piece_digest(piece: memoryview) -> bytes:
    return xxhash.xxh3_128(piece).digest()


def _hash_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max(1, min(HASH_THREADS, os.cpu_count() or 1)), "shard-hash")


# ---------------------------------------------------------------------------------------
# reading


def read_shard(
    path: str,
    *,
    expected_checksum: str | None = None,
    expected_file_checksum: str | None = None,
    retry_s: float = 5.0,
    parse_timeout_s: float = PARSE_TIMEOUT_S,
) -> RolloutBatch:
    """Verify the bytes of `path`, then parse exactly those bytes; return the batch.

    The whole file is read and hashed before HDF5 sees a byte (HDF5 may loop forever on
    corrupted metadata). Its XXH3-128 must equal a checksum this reader trusts:
    `expected_file_checksum` (the writer's announcement over MPI), else the writer's
    sidecar (`shard-0003.json`). With neither, the file is parsed first in a child process
    killed after `parse_timeout_s`. Then the batch is checked as before: format, schema,
    the stored content checksum, and `expected_checksum` (the announced content checksum,
    `ShardInfo.checksum`), if given.

    A missing file is retried for up to `retry_s` seconds (another node's rename may not be
    visible yet on NFS). Anything else wrong raises `ShardError` at once.
    """
    return _load(path, expected_checksum, expected_file_checksum, retry_s, parse_timeout_s)[0]


@dataclass(frozen=True)
class _Verified:
    """How a shard's bytes were verified and what `hpcalign inspect` shows about them."""

    file_checksum: str
    trusted_by: str  # "verified by its sidecar shard-0003.json", ...
    size_bytes: int
    checksum: str  # the content checksum
    format_version: int
    token_dtype: str
    compression: str


def _load(path: str, expected_checksum: str | None, expected_file_checksum: str | None,
          retry_s: float, parse_timeout_s: float) -> tuple[RolloutBatch, _Verified]:
    """`read_shard`, also saying how the bytes were verified."""
    _wait_for_file(path, retry_s)
    record = _read_sidecar(path) if expected_file_checksum is None else None
    if record is not None and record["format_version"] not in READABLE_VERSIONS:
        raise ShardError(path, f"format version {record['format_version']} (from its sidecar) "
                               f"is not supported, this reader knows "
                               f"{', '.join(map(str, READABLE_VERSIONS))}")
    data = _read_bytes(path, None if record is None else int(record["size_bytes"]))
    file_checksum = xxhash.xxh3_128(data).hexdigest()
    if expected_file_checksum is not None:
        if file_checksum != expected_file_checksum:
            raise ShardError(path, f"file checksum {file_checksum} differs from the announced "
                                   f"{expected_file_checksum}: corrupted or stale, not parsed")
        trusted_by = "verified by the announced checksum"
    elif record is not None:
        if file_checksum != record["file_checksum"]:
            raise ShardError(path, f"file checksum {file_checksum} differs from "
                                   f"{record['file_checksum']} recorded in its sidecar "
                                   f"{sidecar_path(path)}: corrupted or stale, not parsed")
        trusted_by = f"verified by its sidecar {os.path.basename(sidecar_path(path))}"
    else:
        parsed = _parse_in_child(path, parse_timeout_s)
        if parsed != file_checksum:
            raise ShardError(path, "changed while being read (file checksum "
                                   f"{file_checksum}, then {parsed}): read it again")
        trusted_by = f"no sidecar: parsed first in a child process bounded to {parse_timeout_s:g} s"
    batch, verified = _parse(path, data, expected_checksum)
    return batch, _Verified(file_checksum=file_checksum, trusted_by=trusted_by,
                            size_bytes=len(data), **verified)


def _read_bytes(path: str, expected_size: int | None) -> np.ndarray:
    """The whole file as uint8, read once: the bytes hashed are the bytes parsed, so a file
    replaced or changed between the hash and the parse cannot slip through.

    NOTE: into a numpy buffer, not `bytes`: numpy asks for huge pages for large arrays, which
    halves the page-fault cost of a fresh 256 MB buffer (85 vs 185 ms on the CI machine kind).
    """
    try:
        with open(path, "rb", buffering=0) as handle:
            size = os.fstat(handle.fileno()).st_size
            if expected_size is not None and size != expected_size:
                raise ShardError(path, f"file has {size} bytes, its sidecar says {expected_size}: "
                                       "truncated or replaced, not parsed")
            try:
                data = np.empty(size, np.uint8)
            except MemoryError:
                raise ShardError(path, f"{size} bytes do not fit in memory") from None
            view, done = memoryview(data), 0
            while done < size:
                got = handle.readinto(view[done:])
                if not got:
                    break
                done += got
            more = handle.read(1)
    except OSError as err:
        raise ShardError(path, f"cannot read ({err.strerror or err})") from None
    if done != size or more:
        raise ShardError(path, f"changed size while being read ({size} bytes, then {done}"
                               f"{'+' if more else ''})")
    return data


class _MemoryFile:
    """A read-only file object over verified bytes, for h5py's `fileobj` driver."""

    def __init__(self, data: np.ndarray) -> None:
        self._data = memoryview(data)
        self._position = 0

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: len(self._data)}
        self._position = max(0, base[whence] + offset)
        return self._position

    def tell(self) -> int:
        return self._position

    def readinto(self, buffer) -> int:
        target = memoryview(buffer).cast("B")
        piece = self._data[self._position : self._position + len(target)]
        target[: len(piece)] = piece
        self._position += len(piece)
        return len(piece)

    def read(self, size: int = -1) -> bytes:
        end = len(self._data) if size < 0 else self._position + size
        piece = bytes(self._data[self._position : end])
        self._position += len(piece)
        return piece

    def flush(self) -> None:
        pass


def _dataset_array(path: str, dset: h5py.Dataset, data: np.ndarray,
                   in_place: bool) -> np.ndarray:
    """A dataset's values: for a contiguous dataset, a view of the verified bytes (no second
    copy of the file; copied only where misaligned for its dtype), else read by h5py."""
    offset = dset.id.get_offset() if in_place and dset.chunks is None else None
    if offset is None:  # chunked or compressed, empty (never allocated), or a userblock
        return dset[()]
    nbytes = dset.size * dset.dtype.itemsize
    if offset + nbytes > len(data):
        raise ShardError(path, f"dataset {dset.name.lstrip('/')!r} lies past the end of the "
                               f"file ({offset} + {nbytes} bytes)")
    values = data[offset : offset + nbytes].view(dset.dtype)
    return values if offset % dset.dtype.itemsize == 0 else values.copy()


def _parse(path: str, data: np.ndarray,
           expected_checksum: str | None) -> tuple[RolloutBatch, dict[str, str | int]]:
    """Parse a shard's bytes (already verified, or inside the bounded child) with h5py.

    NOTE: h5py reads the bytes in memory, never the path again: what HDF5 parses is what
    was hashed. HDF5 parses only the metadata; contiguous datasets are views of `data`.
    """
    try:
        with h5py.File(_MemoryFile(data), "r") as f, _hash_pool() as pool:
            attrs, datasets, stored_checksum = _check_metadata(path, f, len(data))
            checksum = _Checksum(attrs, pool)
            arrays = {}
            in_place = f.userblock_size == 0  # then dataset offsets are offsets in `data`
            for name, _, _ in _datasets(int(attrs["format_version"])):  # checksum order
                arrays[name] = _dataset_array(path, datasets[name], data, in_place)
                checksum.add(name, arrays[name])
                if name.endswith("_offsets"):
                    _check_offsets(path, name, arrays[name], datasets)
            actual = checksum.hexdigest()
            verified: dict[str, str | int] = {
                "checksum": actual, "format_version": int(attrs["format_version"]),
                "token_dtype": str(datasets["completion_tokens"].dtype),
                "compression": datasets["completion_tokens"].compression or "none"}
    except ShardError:
        raise
    except Exception as err:
        # NOTE: a truncated or corrupted file fails inside HDF5 in many ways (OSError,
        # KeyError, RuntimeError, ValueError...); all of them mean "do not use this file".
        raise ShardError(path, f"cannot read HDF5 ({type(err).__name__}: {err})") from err

    if actual != stored_checksum:
        raise ShardError(path, f"checksum mismatch: stored {stored_checksum}, data gives {actual}")
    if expected_checksum is not None and actual != expected_checksum:
        raise ShardError(
            path, f"checksum {actual} differs from the announced {expected_checksum} (stale file?)"
        )
    if np.any(arrays["finished"] > 1):
        raise ShardError(path, "dataset 'finished' holds values other than 0 and 1")
    placed = _RUN_SHARD_PATH.search(os.path.abspath(path).replace(os.sep, "/"))
    if placed and (int(placed[1]), int(placed[2])) != (attrs["step"], attrs["generator_rank"]):
        raise ShardError(path, f"holds step {attrs['step']} of generator rank "
                               f"{attrs['generator_rank']}, not what its path names: a "
                               "misplaced shard")
    completion_offsets = arrays["completion_offsets"]
    names = tuple(json.loads(attrs["reward_names_json"])) if "reward_names_json" in attrs else ()
    values = arrays.get("reward_values")
    batch = RolloutBatch(
        step=int(attrs["step"]),
        policy_version=int(attrs["policy_version"]),
        generator_rank=int(attrs["generator_rank"]),
        prompt_ids=arrays["prompt_ids"].astype(np.int64, copy=False),
        prompt_tokens=Ragged(
            arrays["prompt_tokens"].astype(TOKEN_DTYPE, copy=False), arrays["prompt_offsets"]
        ),
        completion_tokens=Ragged(
            arrays["completion_tokens"].astype(TOKEN_DTYPE, copy=False), completion_offsets
        ),
        logprobs=Ragged(
            arrays["logprobs"].astype(np.float32, copy=False), completion_offsets.copy()
        ),
        rewards=arrays["rewards"].astype(np.float32, copy=False),
        seeds=arrays["seeds"].astype(np.int64, copy=False),
        finished=arrays["finished"].astype(bool),
        attrs=json.loads(attrs["attrs_json"]),
        reward_names=names,
        reward_values=None if values is None else values.astype(np.float32, copy=False).reshape(
            len(arrays["prompt_ids"]), len(names)),
    )
    return batch, verified


def _wait_for_file(path: str, retry_s: float) -> None:
    deadline = time.monotonic() + retry_s
    delay_s = 0.05
    while not os.path.exists(path):
        # NOTE: listing the parent makes the NFS client revalidate its cached directory
        # attributes; without it a file renamed on another node can stay invisible for the
        # attribute-cache lifetime (acdirmax, up to 60 s).
        parent = os.path.dirname(os.path.abspath(path))
        try:
            os.listdir(parent)
        except OSError:
            pass
        if os.path.exists(path):
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ShardError(path, f"no such file (still missing after {retry_s:g} s of retries)")
        time.sleep(min(delay_s, remaining))
        delay_s = min(delay_s * 2, 1.0)


def _check_metadata(path: str, f: h5py.File,
                    file_size: int) -> tuple[dict, dict[str, h5py.Dataset], str]:
    """Check format, version, attributes, dataset dtypes and lengths without reading data.

    Returns the checksummed attributes, the datasets by name and the stored checksum.
    """
    fmt = f.attrs.get("format")
    if fmt != SHARD_FORMAT:
        raise ShardError(path, f"not an {SHARD_FORMAT} shard (format attribute {fmt!r})")
    version = f.attrs.get("format_version")
    if version is None or int(version) not in READABLE_VERSIONS:
        newer = version is not None and int(version) > SHARD_FORMAT_VERSION
        hint = " (written by a newer hpcalign; upgrade to read it)" if newer else ""
        raise ShardError(
            path,
            f"format version {version} is not supported, this reader knows "
            f"{', '.join(map(str, READABLE_VERSIONS))}{hint}",
        )
    version = int(version)
    attrs: dict[str, str | int] = {"format": SHARD_FORMAT, "format_version": version}
    for name in _INT_ATTRS:
        value = f.attrs.get(name)
        if value is None or not np.issubdtype(np.asarray(value).dtype, np.integer):
            raise ShardError(path, f"attribute {name!r} missing or not an integer ({value!r})")
        attrs[name] = int(value)
    for name in ("attrs_json", "checksum"):
        if not isinstance(f.attrs.get(name), str):
            raise ShardError(path, f"attribute {name!r} missing or not a string")
    attrs["attrs_json"] = f.attrs["attrs_json"]
    try:
        if not isinstance(json.loads(attrs["attrs_json"]), dict):
            raise ValueError("not an object")
    except ValueError as err:
        raise ShardError(path, f"attribute 'attrs_json' is not a JSON object ({err})") from None

    n = attrs["num_samples"]
    if n < 0:
        raise ShardError(path, f"num_samples is negative ({n})")
    expected_rows = {"N": n, "N+1": n + 1}
    if version == 2:
        attrs["reward_names_json"] = _reward_names_json(path, f.attrs.get("reward_names_json"))
        expected_rows["N*F"] = n * len(json.loads(attrs["reward_names_json"]))
    datasets: dict[str, h5py.Dataset] = {}
    for name, dtype, rows in _datasets(version):
        dset = f.get(name)
        if not isinstance(dset, h5py.Dataset):
            raise ShardError(path, f"dataset {name!r} is missing")
        allowed = _DISK_TOKEN_DTYPES if dtype is None else (dtype,)
        if dset.dtype not in allowed or dset.ndim != 1:
            raise ShardError(
                path,
                f"dataset {name!r} is {dset.dtype}{list(dset.shape)}, expected 1-D "
                f"{' or '.join(str(d) for d in allowed)}",
            )
        if rows in expected_rows and len(dset) != expected_rows[rows]:
            raise ShardError(
                path,
                f"dataset {name!r} has {len(dset)} rows, expected {expected_rows[rows]} "
                f"for {n} samples",
            )
        # NOTE: a shard's data lives in the shard: external raw data or a virtual dataset
        # would make HDF5 read other files, bytes nobody verified.
        if dset.is_virtual or dset.id.get_create_plist().get_external_count():
            raise ShardError(path, f"dataset {name!r} keeps its data in other files")
        # NOTE: checked before reading, so a corrupted shape cannot make us allocate gigabytes.
        if dset.compression is None and dset.nbytes > file_size:
            raise ShardError(
                path, f"dataset {name!r} claims {dset.nbytes} bytes, file has {file_size}"
            )
        datasets[name] = dset
    if datasets["prompt_tokens"].dtype != datasets["completion_tokens"].dtype:
        raise ShardError(path, "prompt_tokens and completion_tokens have different dtypes")
    if len(datasets["logprobs"]) != len(datasets["completion_tokens"]):
        raise ShardError(path, "logprobs and completion_tokens differ in length")
    return attrs, datasets, f.attrs["checksum"]


def _reward_names_json(path: str, value: object) -> str:
    """The checked `reward_names_json` attribute of a version-2 shard."""
    if not isinstance(value, str):
        raise ShardError(path, "attribute 'reward_names_json' missing or not a string")
    try:
        names = json.loads(value)
    except ValueError:
        names = None
    if (not isinstance(names, list) or not all(isinstance(x, str) and x for x in names)
            or len(set(names)) != len(names)):
        raise ShardError(path, f"attribute 'reward_names_json' is not a JSON list of distinct "
                               f"names ({value[:100]!r})")
    return value


def _check_offsets(
    path: str, name: str, offsets: np.ndarray, datasets: dict[str, h5py.Dataset]
) -> None:
    flat = {"prompt_offsets": "prompt_tokens", "completion_offsets": "completion_tokens"}[name]
    problem = _offsets_problem(offsets, len(datasets[flat]))
    if problem:
        raise ShardError(path, f"{name} cannot index {flat}: {problem}")


def _offsets_problem(offsets: np.ndarray, flat_len: int) -> str | None:
    """Why `offsets` cannot index a flat array of `flat_len` elements, or None if it can."""
    if offsets.ndim != 1 or len(offsets) == 0:
        return f"offsets must be 1-D with N+1 >= 1 entries, got shape {offsets.shape}"
    if offsets[0] != 0:
        return f"offsets[0] is {offsets[0]}, must be 0"
    if np.any(np.diff(offsets) < 0):
        return "offsets are not monotone non-decreasing"
    if offsets[-1] != flat_len:
        return f"last offset {offsets[-1]} != flat length {flat_len}"
    return None


# ---------------------------------------------------------------------------------------
# the bounded parse of a file nobody vouches for

# The child imports this module by name: make it importable however the parent found it.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_PROBE = "import sys; from hpcalign.data.shards import _probe_main; sys.exit(_probe_main(sys.argv[1]))"


def _parse_in_child(path: str, timeout_s: float) -> str:
    """Fully check `path` in a fresh Python process killed after `timeout_s`; return the
    whole-file checksum of the bytes it parsed (the caller compares it with its own).

    NOTE: a subprocess rather than a thread: HDF5 loops inside C holding h5py's lock and
    the GIL, so no thread could time it out, and the same corruption may crash it instead.
    The child answers one JSON line on stdout (no pickle).
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    try:
        done = subprocess.run([sys.executable or "python3", "-c", _PROBE, path], env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              errors="replace", timeout=timeout_s)
    except subprocess.TimeoutExpired:  # subprocess.run has killed and reaped the child
        raise ShardError(path, f"timed out parsing HDF5 after {timeout_s:g} s: treat as "
                               "corrupted (HDF5 can loop forever on corrupted metadata)") from None
    if done.returncode < 0:
        raise ShardError(path, f"the HDF5 parser died of signal {-done.returncode} in a child "
                               "process: treat as corrupted")
    lines = done.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1])
        file_checksum, error = str(answer["file_checksum"]), answer["error"]
    except (IndexError, ValueError, KeyError, TypeError):
        said = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ShardError(path, f"bounded parse failed (exit {done.returncode}): {said}") from None
    if error is not None:
        raise ShardError(path, str(error))
    return file_checksum


def _probe_main(path: str) -> int:
    """The child of `_parse_in_child`: read, hash and fully check `path`; one JSON line."""
    file_checksum, error = None, None
    try:
        data = _read_bytes(path, None)
        file_checksum = xxhash.xxh3_128(data).hexdigest()
        _parse(path, data, None)
    except ShardError as err:
        error = err.reason
    print(json.dumps({"file_checksum": file_checksum, "error": error}), flush=True)
    return 0


# ---------------------------------------------------------------------------------------
# summary


def summarize_shard(path: str, *, parse_timeout_s: float = PARSE_TIMEOUT_S) -> str:
    """A few human lines about a shard, after a full check (used by `hpcalign inspect`).

    Raises ShardError like `read_shard`, without waiting for a missing file. The bytes are
    verified by the shard's sidecar, or, for a file without one (a foreign file, a copy),
    parsed first in a child process killed after `parse_timeout_s`: never parsed unbounded.
    """
    batch, verified = _load(path, None, None, 0.0, parse_timeout_s)
    version, checksum = verified.format_version, verified.checksum
    token_dtype, compression = verified.token_dtype, verified.compression
    size_mb = verified.size_bytes / 1e6
    n = len(batch)
    lengths = batch.completion_tokens.lengths()
    prompt_tokens, completion_tokens = (
        len(batch.prompt_tokens.flat),
        len(batch.completion_tokens.flat),
    )
    lines = [
        path,
        f"  format      {SHARD_FORMAT} v{version}, {size_mb:.2f} MB, "
        f"tokens {token_dtype}, compression {compression}",
        f"  checksum    {_CHECKSUM_ALGORITHM} {checksum[:16]}... OK",
        f"  file        {_CHECKSUM_ALGORITHM} {verified.file_checksum[:16]}... "
        f"{verified.trusted_by}",
        f"  step {batch.step}  policy_version {batch.policy_version}  "
        f"generator_rank {batch.generator_rank}",
        f"  samples     {n} ({len(np.unique(batch.prompt_ids))} prompts), "
        f"finished {int(batch.finished.sum())}/{n}",
        f"  tokens      prompt {prompt_tokens:,}  completion {completion_tokens:,}",
        f"  completion length  {_stats(lengths, '.1f')}",
        f"  reward      {_stats(batch.rewards, '.4g')}",
    ]
    for column, name in enumerate(batch.reward_names):
        values = batch.reward_values[:, column]
        lines.append(f"  reward {name}  {_stats(values[~np.isnan(values)], '.4g')}")
    if batch.attrs:
        lines.append(
            "  attrs       " + "  ".join(f"{k}={v}" for k, v in sorted(batch.attrs.items()))
        )
    return "\n".join(lines)


def _stats(values: np.ndarray, fmt: str) -> str:
    if len(values) == 0:
        return "-"
    v = values.astype(np.float64)
    return (
        f"mean {v.mean():{fmt}}  std {v.std():{fmt}}  min {v.min():{fmt}}  "
        f"p50 {np.median(v):{fmt}}  max {v.max():{fmt}}"
    )
