"""Rollout shards: real HDF5 files written, renamed, read back, and corrupted on purpose."""

from __future__ import annotations

import os
import stat
import threading
import time

import h5py
import numpy as np
import pytest
import xxhash

from hpcalign.data import shards
from hpcalign.data.shards import (
    SHARD_FORMAT_VERSION,
    Ragged,
    RolloutBatch,
    read_shard,
    shard_path,
    summarize_shard,
    write_shard,
)
from hpcalign.errors import ShardError


def make_batch(n: int = 12, vocab: int = 151_936, seed: int = 0) -> RolloutBatch:
    rng = np.random.default_rng(seed)
    prompt_lengths = rng.integers(1, 40, n)
    completion_lengths = rng.integers(0, 60, n)  # includes empty completions
    completion_lengths[: min(n, 1)] = 0
    return RolloutBatch(
        step=42,
        policy_version=41,
        generator_rank=3,
        prompt_ids=np.arange(n, dtype=np.int64) // 4,
        prompt_tokens=Ragged.from_list(
            [rng.integers(0, vocab, k) for k in prompt_lengths], np.int32
        ),
        completion_tokens=Ragged.from_list(
            [rng.integers(0, vocab, k) for k in completion_lengths], np.int32
        ),
        logprobs=Ragged.from_list(
            [-rng.exponential(1.0, k) for k in completion_lengths], np.float32
        ),
        rewards=rng.normal(size=n).astype(np.float32),
        seeds=rng.integers(0, 2**62, n),
        finished=rng.random(n) < 0.5,
        attrs={"task": "countdown", "model": "tiny", "generate_s": 1.25, "max_new_tokens": 64},
    )


def assert_same(a: RolloutBatch, b: RolloutBatch) -> None:
    assert (a.step, a.policy_version, a.generator_rank) == (
        b.step,
        b.policy_version,
        b.generator_rank,
    )
    assert len(a) == len(b)
    for name in ("prompt_ids", "rewards", "seeds", "finished"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        np.testing.assert_array_equal(x, y, err_msg=name)
    for name in ("prompt_tokens", "completion_tokens", "logprobs"):
        x, y = getattr(a, name), getattr(b, name)
        assert len(x) == len(y), name
        for i in range(len(x)):  # element by element, sequence by sequence
            assert x[i].dtype == y[i].dtype, name
            np.testing.assert_array_equal(x[i], y[i], err_msg=f"{name}[{i}]")
    assert a.attrs == b.attrs


@pytest.fixture
def written(tmp_path):
    batch = make_batch()
    path = shard_path(str(tmp_path), batch.step, batch.generator_rank)
    info = write_shard(path, batch)
    return batch, info


# ------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("vocab", [300, 65_536, 151_936])
@pytest.mark.parametrize("compression", [None, "lzf", "gzip"])
def test_round_trip(tmp_path, vocab, compression):
    batch = make_batch(vocab=vocab, seed=vocab)
    info = write_shard(str(tmp_path / "s.h5"), batch, compression=compression)
    assert info.size_bytes == os.path.getsize(info.path)
    back = read_shard(info.path, expected_checksum=info.checksum)
    assert_same(batch, back)
    assert back.prompt_tokens.flat.dtype == np.int32
    with h5py.File(info.path, "r") as f:
        assert f["completion_tokens"].dtype == (np.uint16 if vocab <= 65_536 else np.int32)


def test_checksum_is_independent_of_compression(tmp_path):
    batch = make_batch()
    plain = write_shard(str(tmp_path / "a.h5"), batch)
    packed = write_shard(str(tmp_path / "b.h5"), batch, compression="gzip")
    assert plain.checksum == packed.checksum
    assert len(plain.checksum) == 32  # XXH3-128, hex


def test_empty_batch_round_trips(tmp_path):
    batch = make_batch(n=0)
    info = write_shard(str(tmp_path / "empty.h5"), batch)
    back = read_shard(info.path)
    assert len(back) == 0 and len(back.completion_tokens) == 0
    assert "samples     0" in summarize_shard(info.path)


def test_shard_path_layout():
    assert shard_path("/runs/r1", 42, 3) == "/runs/r1/rollouts/step-000042/shard-0003.h5"


def test_ragged():
    r = Ragged.from_list([[1, 2], [], [3]], np.int32)
    np.testing.assert_array_equal(r.offsets, [0, 2, 2, 3])
    assert r.offsets.dtype == np.int64 and r.flat.dtype == np.int32
    assert len(r) == 3 and r[1].size == 0 and r[-1].tolist() == [3]
    assert [x.tolist() for x in r.to_list()] == [[1, 2], [], [3]]
    np.testing.assert_array_equal(r.lengths(), [2, 0, 1])
    with pytest.raises(IndexError):
        r[3]
    with pytest.raises(ValueError, match="monotone"):
        Ragged(np.zeros(3, np.int32), np.array([0, 2, 1, 3]))
    with pytest.raises(ValueError, match="last offset"):
        Ragged(np.zeros(3, np.int32), np.array([0, 2]))


# ---------------------------------------------------------------------- write protocol


def test_write_leaves_no_temp_file_and_private_dirs(tmp_path, written):
    _, info = written
    directory = os.path.dirname(info.path)
    assert sorted(os.listdir(directory)) == ["shard-0003.h5", "shard-0003.json"]  # + sidecar
    assert stat.S_IMODE(os.stat(info.path).st_mode) == 0o600
    for d in (directory, os.path.dirname(directory)):  # step-000042 and rollouts
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700


def test_final_name_appears_only_complete(tmp_path, monkeypatch):
    batch = make_batch()
    path = str(tmp_path / "rollouts" / "shard-0000.h5")
    seen = []
    real_replace = os.replace

    def checking_replace(src, dst):
        # at the moment of the rename: the final name does not exist yet and the temp file
        # is already a complete, valid, fsynced shard, and its sidecar already names it
        if dst.endswith(".h5"):
            seen.append((os.path.exists(dst), os.path.exists(shards.sidecar_path(dst)),
                         read_shard(src, retry_s=0).step))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", checking_replace)
    write_shard(path, batch)
    assert seen == [(False, True, 42)]
    assert shards.trusted_checksum(path) is not None


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    real_layout = shards._layout

    def failing_layout(data, compression):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return real_layout(data, compression)

    monkeypatch.setattr(shards, "_layout", failing_layout)
    with pytest.raises(OSError, match="No space"):
        write_shard(str(tmp_path / "s.h5"), make_batch())
    assert os.listdir(tmp_path) == []


def test_rewrite_replaces_whole_file(tmp_path):
    path = str(tmp_path / "s.h5")
    write_shard(path, make_batch(seed=1))
    second = make_batch(n=3, seed=2)
    info = write_shard(path, second)
    assert_same(second, read_shard(path, expected_checksum=info.checksum))


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda b: setattr(b, "logprobs", Ragged.from_list([[0.0]] * len(b), np.float32)),
            "aligned",
        ),
        (lambda b: b.completion_tokens.flat.__setitem__(0, -1), "token ids"),
        (lambda b: setattr(b, "rewards", b.rewards[:-1]), "rewards"),
        (lambda b: b.attrs.__setitem__("bad", float("nan")), "finite"),
    ],
)
def test_write_refuses_inconsistent_batch(tmp_path, change, message):
    batch = make_batch()  # its first completion is empty, so one log-prob each misaligns
    change(batch)
    with pytest.raises(ValueError, match=message):
        write_shard(str(tmp_path / "s.h5"), batch)
    assert not os.path.exists(tmp_path / "s.h5")


# ------------------------------------------------------------------------- corruption


def data_offset(dset: h5py.Dataset) -> int:
    """File offset of the first byte of a dataset's data (contiguous or first chunk)."""
    offset = dset.id.get_offset()
    return offset if offset is not None else dset.id.get_chunk_info(0).byte_offset


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0xFF]))


def expect_shard_error(path: str, match: str | None, *, keep_sidecar: bool = False,
                       **kwargs) -> ShardError:
    """read_shard must refuse `path` with `match`. The tests below change a shard after its
    writer recorded it, so its sidecar alone would refuse it (test_shard_corruption.py):
    without the sidecar, as for a foreign file, the parser's own checks must find each
    fault (in the bounded child)."""
    if not keep_sidecar and os.path.exists(shards.sidecar_path(path)):
        os.unlink(shards.sidecar_path(path))
    with pytest.raises(ShardError, match=match) as info:
        read_shard(path, retry_s=0, **kwargs)
    assert info.value.path == path
    assert str(info.value).startswith(path)
    return info.value


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.3, 0.6, 0.999])
def test_truncated_file(written, fraction):
    _, info = written
    with open(info.path, "r+b") as f:
        f.truncate(int(info.size_bytes * fraction))
    expect_shard_error(info.path, "truncated file|file signature not found")


@pytest.mark.parametrize("dataset", ["completion_tokens", "logprobs", "rewards", "prompt_ids"])
@pytest.mark.parametrize("compression", [None, "gzip"])
def test_flipped_data_byte(tmp_path, dataset, compression):
    info = write_shard(str(tmp_path / "s.h5"), make_batch(), compression=compression)
    with h5py.File(info.path, "r") as f:
        offset = data_offset(f[dataset])
    flip_byte(info.path, offset + 3)
    # uncompressed: our checksum catches it; gzip: the inflate or our checksum does
    expect_shard_error(info.path, "checksum mismatch" if compression is None else None)


def test_flipped_superblock_byte(written):
    _, info = written
    flip_byte(info.path, 20)  # inside the checksummed v3 superblock
    expect_shard_error(info.path, "cannot read HDF5")


def test_missing_dataset(written):
    _, info = written
    with h5py.File(info.path, "r+", locking=False) as f:
        del f["logprobs"]
    expect_shard_error(info.path, "'logprobs' is missing")


def test_wrong_dtype(written):
    _, info = written
    with h5py.File(info.path, "r+", locking=False) as f:
        rewards = f["rewards"][()]
        del f["rewards"]
        f["rewards"] = rewards.astype(np.float64)
    expect_shard_error(info.path, "'rewards' is float64")


def test_inconsistent_offsets(written):
    _, info = written
    with h5py.File(info.path, "r+", locking=False) as f:
        offsets = f["completion_offsets"]
        offsets[2], offsets[3] = offsets[3] + 1, offsets[2]
    expect_shard_error(info.path, "completion_offsets cannot index completion_tokens")


def test_inconsistent_sample_count(written):
    _, info = written
    with h5py.File(info.path, "r+", locking=False) as f:
        f.attrs["num_samples"] = np.int64(11)
    expect_shard_error(info.path, "'prompt_ids' has 12 rows, expected 11")


@pytest.mark.parametrize("version, match", [(3, "newer hpcalign"), (0, "not supported")])
def test_wrong_version(written, version, match):
    _, info = written
    with h5py.File(info.path, "r+", locking=False) as f:
        f.attrs["format_version"] = np.int64(version)
    error = expect_shard_error(info.path, match)
    assert "knows 1, 2" in error.reason


def test_wrong_format(tmp_path):
    path = str(tmp_path / "other.h5")
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(3)
    expect_shard_error(path, "not an hpcalign-rollout shard")


def test_not_hdf5_at_all(tmp_path):
    path = tmp_path / "junk.h5"
    path.write_bytes(b"hello" * 100)
    expect_shard_error(str(path), "cannot read HDF5")


def test_changed_attribute_breaks_checksum(written):
    _, info = written
    with h5py.File(info.path, "r+", locking=False) as f:
        f.attrs["policy_version"] = np.int64(40)
    expect_shard_error(info.path, "checksum mismatch")


def test_expected_checksum_mismatch(written):
    _, info = written
    expect_shard_error(info.path, "announced", expected_checksum="0" * 32, keep_sidecar=True)


# ------------------------------------------------------------------------ missing file


def test_missing_file_retries_then_fails(tmp_path):
    path = str(tmp_path / "rollouts" / "nope.h5")
    start = time.monotonic()
    with pytest.raises(ShardError, match="no such file") as info:
        read_shard(path, retry_s=0.3)
    assert 0.3 <= time.monotonic() - start < 2.0
    assert info.value.path == path


def test_missing_file_that_appears_during_retry(tmp_path):
    batch = make_batch()
    path = str(tmp_path / "late.h5")
    writer = threading.Timer(0.2, write_shard, args=(path, batch))
    writer.start()
    try:
        assert_same(batch, read_shard(path, retry_s=3.0))
    finally:
        writer.join()


# ----------------------------------------------------------------------------- summary


def test_summary(written):
    batch, info = written
    text = summarize_shard(info.path)
    assert text.splitlines()[0] == info.path
    assert "step 42  policy_version 41  generator_rank 3" in text
    assert f"samples     {len(batch)} (3 prompts)" in text
    assert f"completion {len(batch.completion_tokens.flat):,}" in text
    assert f"mean {batch.rewards.astype(np.float64).mean():.4g}" in text
    assert "OK" in text and "task=countdown" in text


def test_checksum_matches_the_documented_definition(written):
    """Recompute the checksum as docs/shard-format.md defines it, from h5py alone."""
    import json

    _, info = written
    order = ["prompt_ids", "prompt_offsets", "prompt_tokens", "completion_offsets"]
    order += ["completion_tokens", "logprobs", "rewards", "seeds", "finished"]
    keys = ["format", "format_version", "step", "policy_version", "generator_rank"]
    keys += ["num_samples", "attrs_json"]
    with h5py.File(info.path, "r") as f:
        header = {k: f.attrs[k] if isinstance(f.attrs[k], str) else int(f.attrs[k]) for k in keys}
        outer = xxhash.xxh3_128()
        outer.update(json.dumps(header, separators=(",", ":")).encode() + b"\n")
        for name in order:
            data = f[name][()]
            outer.update(f"{name}:{data.dtype.str}:{len(data)}\n".encode())
            raw = data.tobytes()
            for start in range(0, len(raw), 4 * 1024 * 1024):
                outer.update(
                    xxhash.xxh3_128(raw[start : start + 4 * 1024 * 1024]).digest()
                )
        assert f.attrs["checksum"] == outer.hexdigest() == info.checksum


def test_checksum_pieces_span_datasets_larger_than_one_piece(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "HASH_PIECE_BYTES", 64)  # many pieces, even in a small shard
    batch = make_batch()
    info = write_shard(str(tmp_path / "s.h5"), batch)
    assert_same(batch, read_shard(info.path))
    with h5py.File(info.path, "r+", locking=False) as f:
        f["logprobs"][-1] = 1.0  # in the last piece
    expect_shard_error(info.path, "checksum mismatch")


def test_uncompressed_is_contiguous_and_compressed_is_chunked(tmp_path):
    batch = make_batch()
    info = write_shard(str(tmp_path / "s.h5"), batch)
    with h5py.File(info.path, "r") as f:
        assert f["completion_tokens"].chunks is None
    assert_same(batch, read_shard(info.path))
    packed = write_shard(str(tmp_path / "z.h5"), batch, compression="lzf")
    with h5py.File(packed.path, "r") as f:
        assert f["completion_tokens"].chunks is not None
    assert_same(batch, read_shard(packed.path))


def test_large_datasets_start_their_writeback_early(tmp_path, monkeypatch):
    """sync_file_range(WRITE) on the temp file after each dataset of >= 1 MiB; the shard is
    the same as without it (durability still comes from the fsync)."""
    if shards._sync_file_range is None:
        pytest.skip("no sync_file_range in this libc")
    real, calls = shards._sync_file_range, []

    def recording(fd, offset, nbytes, flags):
        calls.append((os.readlink(f"/proc/self/fd/{fd}"), offset, nbytes, flags))
        return real(fd, offset, nbytes, flags)

    monkeypatch.setattr(shards, "_sync_file_range", recording)
    batch = make_batch(n=12000)  # ~1.4 MB of completion tokens (int32) and of log-probs
    info = write_shard(str(tmp_path / "big.h5"), batch)
    assert len(calls) >= 2
    assert all(".big.h5.tmp-" in path and flags == 2 for path, _, _, flags in calls)
    monkeypatch.setattr(shards, "_sync_file_range", None)
    plain = write_shard(str(tmp_path / "plain.h5"), batch)
    assert plain.checksum == info.checksum
    assert_same(batch, read_shard(info.path))


def test_chunks_are_even_and_not_padded(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "CHUNK_BYTES", 400)  # 100 int32 tokens per chunk at most
    batch = make_batch(n=40)
    info = write_shard(str(tmp_path / "s.h5"), batch)
    with h5py.File(info.path, "r") as f:
        tokens = f["completion_tokens"]
        (chunk,) = tokens.chunks
        num_chunks = -(-len(tokens) // chunk)
        assert chunk * 4 <= 400 and chunk * num_chunks - len(tokens) < num_chunks
    assert_same(batch, read_shard(info.path))


def test_temp_files_of_a_killed_writer_are_removed_by_the_next_write(tmp_path):
    batch = make_batch()
    path = tmp_path / "step-000003" / "shard-0000.h5"
    path.parent.mkdir()
    stale = path.parent / ".shard-0000.h5.tmp-999-deadbeef"  # a writer SIGKILLed mid-write
    stale.write_bytes(b"half a shard")
    other = path.parent / ".shard-0001.h5.tmp-998-cafe0000"  # another rank's: not ours
    other.write_bytes(b"x")
    write_shard(str(path), batch)
    assert not stale.exists() and other.exists()
    assert read_shard(str(path)).step == batch.step


# -------------------------------------------------- version 2: per-function rewards


def with_reward_functions(batch: RolloutBatch, names=("accuracy", "format")) -> RolloutBatch:
    rng = np.random.default_rng(7)
    values = rng.random((len(batch), len(names))).astype(np.float32)
    values[::3, 0] = np.nan  # "did not apply" (the function returned None)
    batch.reward_names, batch.reward_values = tuple(names), values
    return batch


def test_reward_functions_round_trip_as_version_2(tmp_path):
    batch = with_reward_functions(make_batch())
    info = write_shard(str(tmp_path / "v2.h5"), batch)
    got = read_shard(info.path, expected_checksum=info.checksum)
    assert_same(batch, got)
    assert got.reward_names == ("accuracy", "format")
    np.testing.assert_array_equal(got.reward_values, batch.reward_values)  # NaN where None
    with h5py.File(info.path, "r") as f:
        assert int(f.attrs["format_version"]) == 2 == SHARD_FORMAT_VERSION
        assert f["reward_values"].shape == (len(batch) * 2,)
    assert "reward accuracy  mean" in summarize_shard(info.path)
    plain = write_shard(str(tmp_path / "v1.h5"), make_batch())  # none: still version 1
    with h5py.File(plain.path, "r") as f:
        assert int(f.attrs["format_version"]) == 1 and "reward_values" not in f
    assert read_shard(plain.path).reward_names == ()


def test_reward_functions_are_covered_by_the_checksum(tmp_path):
    info = write_shard(str(tmp_path / "v2.h5"), with_reward_functions(make_batch()))
    with h5py.File(info.path, "r+", locking=False) as f:
        f.attrs["reward_names_json"] = '["accuracy", "length"]'
    expect_shard_error(info.path, "checksum mismatch")
    info = write_shard(str(tmp_path / "v2b.h5"), with_reward_functions(make_batch()))
    with h5py.File(info.path, "r+", locking=False) as f:
        data = f["reward_values"][()]
        data[1] += 1.0
        f["reward_values"][...] = data
    expect_shard_error(info.path, "checksum mismatch")


@pytest.mark.parametrize("change, message", [
    ("names", "reward_names_json' is not a JSON list of distinct names"),
    ("rows", "'reward_values' has 23 rows, expected 24"),
    ("missing", "attribute 'reward_names_json' missing"),
])
def test_bad_version_2_metadata_is_refused(tmp_path, change, message):
    info = write_shard(str(tmp_path / "v2.h5"), with_reward_functions(make_batch()))
    with h5py.File(info.path, "r+", locking=False) as f:
        if change == "names":
            f.attrs["reward_names_json"] = '["a", "a"]'
        elif change == "rows":
            data = f["reward_values"][()]
            del f["reward_values"]
            f["reward_values"] = data[:-1]
        else:
            del f.attrs["reward_names_json"]
    expect_shard_error(info.path, message)


def test_inconsistent_reward_values_are_refused_by_the_writer(tmp_path):
    batch = with_reward_functions(make_batch())
    batch.reward_values = batch.reward_values[:, :1]
    with pytest.raises(ValueError, match=r"reward_values must have shape \[12, 2\]"):
        write_shard(str(tmp_path / "x.h5"), batch)
    batch = with_reward_functions(make_batch(), names=("a", "a"))
    with pytest.raises(ValueError, match="distinct non-empty"):
        write_shard(str(tmp_path / "x.h5"), batch)
