"""Make sure `model.path` holds a model before any rank starts (the launcher's job)."""

from __future__ import annotations

import os

from hpcalign.config.schema import Config
from hpcalign.errors import UserError


def ensure_model(cfg: Config) -> None:
    """Build the tiny model described by `model.init` if `model.path` is still empty."""
    path = cfg.model.path
    if os.path.isfile(os.path.join(path, "config.json")):
        return
    if cfg.model.init is None:
        raise UserError(f"model.path='{path}' holds no HF model (config.json) and model.init "
                        f"is not set; run `hpcalign init-model {path}` or set model.init")
    import transformers

    from hpcalign.models.tiny import init_model

    transformers.utils.logging.disable_progress_bar()

    try:
        init_model(path, cfg.model.init)  # atomic: a temp dir renamed into place
    except (FileExistsError, OSError):
        # NOTE: another run sharing this model.path built it first (its rename won);
        # a whole model is there now, or the error is real.
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise
