"""Make sure `model.path` holds a model before any rank starts.

Run as a child of the launcher, `python -m hpcalign.models.prepare RUN_DIR` (see
`hpcalign.launch.rundir.prepare_model`), so that the launcher itself never imports torch
or transformers: it only writes files and starts processes.
"""

from __future__ import annotations

import os

from hpcalign.config.schema import ModelConfig
from hpcalign.durable import keep_private
from hpcalign.errors import UserError


def ensure_model(model: ModelConfig) -> None:
    """Build the tiny model described by `model.init` if `model.path` is still empty."""
    path = model.path
    if os.path.isfile(os.path.join(path, "config.json")):
        return
    if model.init is None:
        raise UserError(f"model.path='{path}' holds no HF model (config.json) and model.init "
                        f"is not set; run `hpcalign init-model {path}` or set model.init")
    import transformers

    from hpcalign.models.tiny import init_model

    transformers.utils.logging.disable_progress_bar()

    try:
        init_model(path, model.init)  # atomic: a temp dir renamed into place
    except (FileExistsError, OSError):
        # NOTE: another run sharing this model.path built it first (its rename won);
        # a whole model is there now, or the error is real.
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise


def main(argv: list[str] | None = None) -> int:
    """`python -m hpcalign.models.prepare PATH INIT_JSON`: build `model.init` at PATH."""
    import json
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m hpcalign.models.prepare PATH INIT_JSON", file=sys.stderr)
        return 2
    keep_private()
    model = ModelConfig(path=args[0], init=json.loads(args[1]))
    try:
        ensure_model(model)
    except UserError as err:
        print(f"hpcalign: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
