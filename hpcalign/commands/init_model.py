"""`hpcalign init-model DIR`: build a tiny random HF model with a character tokenizer.

The quickstart and every test start from such a model, so nothing is downloaded:

    hpcalign init-model runs/tiny                       # Qwen2, hidden 128, 2 layers
    hpcalign init-model runs/big --hidden 256 --layers 4 --intermediate 1024
    hpcalign init-model runs/tiny --force --symbols 'abc=+ '

A run config can do the same through `model.init`; this command is for building one by hand.
"""

from __future__ import annotations

import argparse
import os

from hpcalign.config.schema import ModelInit
from hpcalign.errors import UserError

HELP = "build a tiny random HF model + character tokenizer (no download)"


def _parser() -> argparse.ArgumentParser:
    defaults = ModelInit()
    parser = argparse.ArgumentParser(prog="hpcalign init-model", description=HELP)
    parser.add_argument("dir", metavar="DIR", help="model directory to create")
    parser.add_argument("--arch", choices=["qwen2", "llama"], default=defaults.arch)
    parser.add_argument("--hidden", type=int, default=defaults.hidden, help="hidden size")
    parser.add_argument("--layers", type=int, default=defaults.layers, help="decoder layers")
    parser.add_argument("--heads", type=int, default=defaults.heads, help="attention heads")
    parser.add_argument("--kv-heads", type=int, default=defaults.kv_heads, help="key/value heads")
    parser.add_argument("--intermediate", type=int, default=defaults.intermediate, help="MLP size")
    parser.add_argument("--untied", action="store_true", help="separate output head")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="init seed")
    parser.add_argument("--symbols", default=None, help="tokenizer characters (default: a-z 0-9 =+ :)")
    parser.add_argument("--force", action="store_true", help="replace an existing DIR")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from pydantic import ValidationError
    from transformers.utils import logging as hf_logging

    from hpcalign.models.tiny import DEFAULT_SYMBOLS, init_model

    hf_logging.disable_progress_bar()  # one line of output, not a "Writing shards" bar

    try:
        init = ModelInit(
            arch=args.arch,
            hidden=args.hidden,
            layers=args.layers,
            heads=args.heads,
            kv_heads=args.kv_heads,
            intermediate=args.intermediate,
            tie_embeddings=not args.untied,
            seed=args.seed,
        )
    except ValidationError as err:
        problems = "; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}"
                             for e in err.errors())
        raise UserError(problems) from err
    if os.path.lexists(args.dir) and not args.force:
        if not (os.path.isdir(args.dir) and not os.listdir(args.dir)):
            raise UserError(f"{args.dir} already exists; pass --force to replace it")
    try:
        init_model(args.dir, init, args.symbols or DEFAULT_SYMBOLS, overwrite=args.force)
    except (ValueError, OSError) as err:
        raise UserError(f"{args.dir}: {err}") from err
    print(f"wrote {args.arch} model to {args.dir}")
    return 0
