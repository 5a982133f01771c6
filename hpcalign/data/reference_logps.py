"""The reference model's log-probs of a preference dataset, computed once, kept as HDF5.

DPO's reference is frozen, so its log-probs of every (prompt, chosen) and (prompt,
rejected) never change: computing them once and keeping them beside the run halves the
forwards of every later step, epoch and resume. `RUN_DIR/reference/train.h5` (and
`eval.h5`) hold, per pair, the summed log-prob and the token count of the chosen and the
rejected completion, with what they were computed from as attributes (the content
hashes of the pairs file and of the reference model, the pair count): a store made from
other data or another reference is refused by name, never silently reused. Written like
a shard: a temp file, fsync, rename; numbers and strings only (no pickles).

    store = ReferenceLogps.load_or_none(path, data_hash, model_hash, pairs=len(ds))
    store = ReferenceLogps(chosen, rejected, chosen_tokens, rejected_tokens); store.save(path, ...)
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

import h5py
import numpy as np

from hpcalign.durable import fsync_dir
from hpcalign.errors import UserError

FORMAT_VERSION = 1
_FIELDS = ("chosen", "rejected", "chosen_tokens", "rejected_tokens")


@dataclass
class ReferenceLogps:
    chosen: np.ndarray  # float64 [P]: summed log-prob of the chosen completion
    rejected: np.ndarray  # float64 [P]
    chosen_tokens: np.ndarray  # int64 [P]: its completion tokens (IPO's per-token mean)
    rejected_tokens: np.ndarray  # int64 [P]

    def save(self, path: str, *, data_hash: str, model_hash: str) -> None:
        """Write atomically and durably (a killed run leaves the old file or none)."""
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with h5py.File(tmp, "w", locking=False) as f:
                f.attrs.update(format_version=FORMAT_VERSION, data_hash=data_hash,
                               model_hash=model_hash, pairs=len(self.chosen))
                for name in _FIELDS:
                    f.create_dataset(name, data=getattr(self, name))
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        fsync_dir(directory)

    @classmethod
    def load_or_none(cls, path: str, *, data_hash: str, model_hash: str,
                     pairs: int) -> ReferenceLogps | None:
        """The store at `path`, None if there is none; UserError if it is from other data
        or another reference model, or unreadable."""
        if not os.path.exists(path):
            return None
        try:
            with h5py.File(path, "r", locking=False) as f:
                attrs = dict(f.attrs)
                arrays = {name: np.asarray(f[name][()]) for name in _FIELDS}
        except (OSError, KeyError) as err:
            raise UserError(f"{path}: unreadable reference log-probs ({err}); delete it to "
                            "recompute them") from err
        expected = {"format_version": FORMAT_VERSION, "data_hash": data_hash,
                    "model_hash": model_hash, "pairs": pairs}
        differs = [key for key, value in expected.items() if attrs.get(key) != value]
        if differs or any(len(a) != pairs for a in arrays.values()):
            raise UserError(f"{path}: reference log-probs of other data or another reference "
                            f"model ({', '.join(differs) or 'lengths'} differ); use a new run_dir "
                            "or delete the file to recompute them")
        return cls(**arrays)
