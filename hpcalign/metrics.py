"""Training metrics: one JSON line per step in `RUN_DIR/metrics.jsonl`, plus TensorBoard.

The JSONL file is the record of a run: plain text on the shared filesystem, readable with
`tail -f`, `jq` or pandas while the job runs, and the input of `hpcalign plot` and
`hpcalign report`. TensorBoard scalars under `RUN_DIR/tb` are a convenience view.

A Slurm job is killed and requeued; a resumed run restarts from its last checkpoint, which
is older than its last metrics line. So the writer drops the lines of the steps it is about
to redo: the first `write(step=s)` keeps only earlier lines with step < s, and TensorBoard
purges its events from step s on. Every step then appears once.

Keys are flat; `hpcalign plot` knows `reward_mean`, `reward_std`, `loss`, `kl`, `entropy`,
`response_len_mean`, `samples_per_s` and phase times `time_<phase>_s`.

    writer = MetricsWriter(run_dir)
    writer.write(step, {"reward_mean": 0.4, "loss": 1.2, "time_generate_s": 3.1})
    writer.close()
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from hpcalign.durable import atomic_write_text
from hpcalign.errors import UserError

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tb"


class MetricsWriter:
    """Appends one JSON line per step to `RUN_DIR/metrics.jsonl`; optionally TensorBoard."""

    def __init__(self, run_dir: str, tensorboard: bool = True) -> None:
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, METRICS_FILE)
        self._tensorboard = tensorboard
        self._file: Any = None  # opened at the first write, once we know the resume step
        self._tb: Any = None
        self._last_step: int | None = None

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """Record the metrics of `step`; steps must increase within one writer."""
        step = int(step)
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(
                f"step {step} written after step {self._last_step}: write each step once, "
                "with all its metrics in one call"
            )
        record: dict[str, float | int | None] = {"step": step}
        for key, value in metrics.items():
            if not isinstance(key, str) or key == "step":
                raise ValueError(f"metric keys must be strings other than 'step', got {key!r}")
            number = float(value)
            # NOTE: NaN/inf are written as null so the file stays strict JSON (jq, pandas);
            # read_metrics turns null back into NaN, TensorBoard gets the real value.
            record[key] = number if math.isfinite(number) else None
        if self._file is None:
            self._open(step)
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()  # NOTE: per line, so `tail -f` and a killed job lose nothing
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, float(value), step)
        self._last_step = step

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self, first_step: int) -> None:
        """Drop the lines of steps >= first_step (and a torn last line), then append."""
        os.makedirs(self.run_dir, exist_ok=True)
        if os.path.exists(self.path):
            with open(self.path) as f:
                text = f.read()
            kept = [r for r in _parse(text, self.path) if r["step"] < first_step]
            new_text = "".join(json.dumps(_to_json(r), allow_nan=False) + "\n" for r in kept)
            if new_text != text:
                # NOTE: rewrite through a temp file and rename, so a kill here leaves
                # either the old or the new file, never a half-written one.
                atomic_write_text(self.path, new_text)
        self._file = open(self.path, "a")  # kept open: one line per step
        if self._tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides the events a killed run logged for the steps it redoes
            self._tb = SummaryWriter(
                os.path.join(self.run_dir, TENSORBOARD_DIR), purge_step=first_step
            )


def read_metrics(run_dir: str) -> list[dict]:
    """All step records of a run, in file order; [] if there is no metrics file yet.

    A torn last line (the job was killed mid-write) is skipped; any other bad line raises
    UserError naming the file and line. null values come back as NaN.
    """
    path = os.path.join(run_dir, METRICS_FILE)
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return []
    return _parse(text, path)


def _parse(text: str, path: str) -> list[dict]:
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        last = number == len(lines)  # text did not end with a newline: maybe torn
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not an object with an integer 'step'")
        except ValueError as err:
            if last:
                break
            raise UserError(f"{path}:{number}: bad metrics line ({err}): {line[:80]!r}") from None
        records.append({k: (math.nan if v is None else v) for k, v in record.items()})
    return records


def _to_json(record: dict) -> dict:
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()
    }
