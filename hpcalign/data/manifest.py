"""`OUT/manifest.json` of an offline rollout: what was sampled from what, and every shard.

A rollout directory is only worth something if one can say later which checkpoint and
which prompts made it, with which settings, and that every shard is still the one written.
Each part of a rollout (an array task, or one of `--workers`) records its own piece in
`OUT/manifest.d/part-0003.json` when it finishes; whichever part finds every piece there
assembles `OUT/manifest.json` (the same bytes whoever does it, so two tasks finishing at
once cannot disagree). `verify_manifest` is what `hpcalign inspect OUT` runs:

    problems = verify_manifest("runs/r1/offline")   # [] when everything matches

Content hashes are XXH3-128 (the shards' file checksum): of a file's bytes, or of a
directory's files (relative path, size and bytes of each, in sorted order).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from typing import Any

import xxhash

from hpcalign.durable import atomic_write_text
from hpcalign.errors import ShardError, UserError

MANIFEST = "manifest.json"
PARTS_DIR = "manifest.d"
FORMAT_VERSION = 1
_CHUNK = 1 << 22


def content_hash(path: str) -> str:
    """XXH3-128 hex digest of a file, or of every file under a directory (names included)."""
    digest = xxhash.xxh3_128()
    if os.path.isfile(path):
        _hash_file(digest, path)
        return digest.hexdigest()
    for relative in _files_under(path):
        digest.update(relative.encode() + b"\0")
        full = os.path.join(path, relative)
        digest.update(str(os.path.getsize(full)).encode() + b"\0")
        _hash_file(digest, full)
    return digest.hexdigest()


def _files_under(root: str) -> list[str]:
    out = []
    for directory, subdirs, files in os.walk(root):
        subdirs.sort()
        for name in files:
            out.append(os.path.relpath(os.path.join(directory, name), root))
    return sorted(out)


def _hash_file(digest: Any, path: str) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)


def part_path(out_dir: str, part: int) -> str:
    return os.path.join(out_dir, PARTS_DIR, f"part-{part:04d}.json")


def write_part(out_dir: str, part: int, record: dict[str, Any]) -> None:
    """Record part `part`'s piece of the manifest (atomic; a rerun rewrites it)."""
    os.makedirs(os.path.join(out_dir, PARTS_DIR), mode=0o700, exist_ok=True)
    atomic_write_text(part_path(out_dir, part),
                      json.dumps(record, indent=1, sort_keys=True, allow_nan=False) + "\n")


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable manifest ({type(err).__name__}: {err})") from err
    if not isinstance(value, dict):
        raise UserError(f"{path}: not a manifest (a JSON object)")
    return value


# what every part must agree on (the rest of a part is its shards)
_SHARED_KEYS = ("format_version", "checkpoint", "prompts", "sampling", "parts", "batch_size")


def assemble(out_dir: str, parts: int) -> str | None:
    """Write `OUT/manifest.json` if all `parts` pieces are there; its path, else None.

    Raises UserError when two parts disagree on what the rollout is (another checkpoint,
    prompt file or settings): the directory then mixes two rollouts.
    """
    pieces = []
    for part in range(parts):
        path = part_path(out_dir, part)
        if not os.path.exists(path):
            return None
        pieces.append(_read_json(path))
    first = pieces[0]
    for part, piece in enumerate(pieces[1:], start=1):
        differs = [key for key in _SHARED_KEYS if piece.get(key) != first.get(key)]
        if differs:
            raise UserError(f"{part_path(out_dir, part)} and {part_path(out_dir, 0)} describe "
                            f"different rollouts ({', '.join(differs)} differ); write to a new "
                            "--out directory")
    shards = sorted((s for piece in pieces for s in piece["shards"]), key=lambda s: s["file"])
    manifest = {key: first[key] for key in _SHARED_KEYS}
    manifest.update(shards=shards, samples=sum(s["samples"] for s in shards))
    path = os.path.join(out_dir, MANIFEST)
    atomic_write_text(path, json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False) + "\n")
    return path


def read_manifest(out_dir: str) -> dict[str, Any]:
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        raise UserError(f"{out_dir}: no {MANIFEST} (not a finished `hpcalign rollout` directory; "
                        "a rollout writes it when its last part ends)")
    manifest = _read_json(path)
    missing = [key for key in (*_SHARED_KEYS, "shards") if key not in manifest]
    if missing:
        raise UserError(f"{path}: not a rollout manifest (no {', '.join(missing)})")
    return manifest


def update_shard(out_dir: str, file: str, file_checksum: str, samples: int) -> None:
    """Record a shard rewritten in place (`hpcalign rescore`): its new checksum, in the
    manifest and in the piece of the part that wrote it."""
    targets = [os.path.join(out_dir, MANIFEST),
               *sorted(glob.glob(os.path.join(out_dir, PARTS_DIR, "part-*.json")))]
    for path in targets:
        if not os.path.exists(path):
            continue
        record = _read_json(path)
        changed = False
        for shard in record.get("shards", []):
            if shard.get("file") == file:
                shard.update(file_checksum=file_checksum, samples=samples)
                changed = True
        if changed:
            atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True,
                                               allow_nan=False) + "\n")


def verify_manifest(out_dir: str) -> Iterator[tuple[bool, str]]:
    """(ok, line) for every check of `OUT/manifest.json`: each shard's bytes against its
    recorded checksum and sample count, files in OUT the manifest does not list, and the
    checkpoint and prompts against their recorded content hashes (where they still exist)."""
    from hpcalign.data.shards import read_shard

    manifest = read_manifest(out_dir)
    listed = set()
    for shard in manifest["shards"]:
        path = os.path.join(out_dir, shard["file"])
        listed.add(os.path.realpath(path))
        try:
            batch = read_shard(path, expected_file_checksum=shard["file_checksum"], retry_s=0)
        except ShardError as err:
            yield False, f"BAD {err}"
            continue
        if len(batch) != shard["samples"]:
            yield False, (f"BAD {path}: {len(batch)} samples, the manifest says "
                          f"{shard['samples']}")
            continue
        yield True, f"ok  {path}: {len(batch)} samples, checksum {shard['file_checksum'][:12]}"
    for path in sorted(glob.glob(os.path.join(out_dir, "**", "*.h5"), recursive=True)):
        if os.path.realpath(path) not in listed:
            yield False, f"BAD {path}: a shard the manifest does not list (foreign, or stale)"
    for what in ("checkpoint", "prompts"):
        source = manifest[what]
        path = source.get("path", "")
        if not os.path.exists(path):
            yield True, f"--  {what} {path}: gone, its hash {source['content_hash'][:12]} not checked"
            continue
        now = content_hash(path)
        if now != source["content_hash"]:
            yield False, (f"BAD {what} {path}: content hash {now[:12]} is not the "
                          f"{source['content_hash'][:12]} the rollout was sampled from")
        else:
            yield True, f"ok  {what} {path}: content hash {now[:12]}"
