"""`hpcalign convert`: HF checkpoints <-> megatron distributed checkpoints.

    hpcalign convert hf-to-megatron HF_DIR OUT_DIR --tp 2 --pp 1
    hpcalign convert megatron-to-hf MEGATRON_DIR OUT_DIR

`hf-to-megatron` writes megatron's `dist_checkpointing` format (layout-free: the engine
loads it at any TP x PP, resharding on load) with the vocabulary padded to a multiple of
tp x 128, after checking that the model splits over tp x pp; the HF tokenizer and config
files travel along (OUT_DIR/hf/). `megatron-to-hf` writes an HF directory
(model.safetensors + those files), the padding cut off. HF -> megatron -> HF gives back
the input's tensors bit for bit, in the input's dtype (float32 or bfloat16).

Both run in this one process (a gloo world of one): the whole model is in memory once.
The trainer's own checkpoints (RUN_DIR/checkpoints/step-N/megatron) are the same format.
"""

from __future__ import annotations

import argparse
import os

from hpcalign.errors import UserError

HELP = "convert checkpoints: hf-to-megatron SRC DST --tp N --pp M | megatron-to-hf SRC DST"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpcalign convert", description=HELP)
    sub = parser.add_subparsers(dest="direction", required=True)
    to_megatron = sub.add_parser("hf-to-megatron", help="HF directory -> megatron checkpoint")
    to_megatron.add_argument("src", metavar="SRC", help="HF model directory (safetensors)")
    to_megatron.add_argument("dst", metavar="DST", help="megatron checkpoint directory to create")
    to_megatron.add_argument("--tp", type=int, default=1, help="tensor-parallel degree it is for")
    to_megatron.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree it is for")
    to_hf = sub.add_parser("megatron-to-hf", help="megatron checkpoint -> HF directory")
    to_hf.add_argument("src", metavar="SRC", help="megatron checkpoint directory")
    to_hf.add_argument("dst", metavar="DST", help="HF model directory to create")
    return parser


def _fresh(path: str) -> None:
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise UserError(f"{path}: exists and is not an empty directory")


def _dtype_of(tensors: dict) -> object:
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1:
        raise UserError(f"weights of mixed dtypes {sorted(map(str, dtypes))}: convert them to "
                        "one dtype first")
    dtype = dtypes.pop()
    import torch

    if dtype not in (torch.float32, torch.bfloat16):
        raise UserError(f"weights are {dtype}; expected float32 or bfloat16")
    return dtype


def hf_to_megatron(src: str, dst: str, tp: int, pp: int) -> None:
    """HF directory `src` -> megatron dist checkpoint `dst` padded for `tp`."""
    from hpcalign.engines.megatron import weights as W
    from hpcalign.engines.megatron.checkpoint import save_dist_checkpoint
    from hpcalign.engines.megatron.engine import _hf_weights, _load_local
    from hpcalign.engines.megatron.model import GptShape, build_gpt_model
    from hpcalign.engines.megatron.parallel import init_model_parallel

    if tp < 1 or pp < 1:
        raise UserError(f"--tp {tp} --pp {pp}: degrees must be >= 1")
    if not os.path.isfile(os.path.join(src, "config.json")):
        raise UserError(f"{src}: not an HF model directory (no config.json)")
    shape = GptShape.from_hf_dir(src)
    shape.check_layout(tp, pp)
    _fresh(dst)
    hf = _hf_weights(src)
    if not hf:
        raise UserError(f"{src}: no *.safetensors weights")
    dtype = _dtype_of(hf)
    init_model_parallel(1, 1, seed=0)
    padded = shape.padded_vocab(tp)
    model = build_gpt_model(shape, tp=1, pp=1, dtype=dtype, padded_vocab=padded)
    _load_local(model, W.local_state(W.hf_to_global(hf, shape, padded), shape, tp=1,
                                     tp_rank=0, pp=1, pp_rank=0))
    meta = {"shape": shape.to_dict(), "padded_vocab": padded, "tp": tp, "pp": pp,
            "dtype": str(dtype).removeprefix("torch.")}
    save_dist_checkpoint(model, dst, meta, source_dir=src)


def megatron_to_hf(src: str, dst: str) -> None:
    """megatron dist checkpoint `src` -> HF directory `dst` (padding cut off)."""
    import torch
    from safetensors.torch import save_file

    from hpcalign.engines.megatron import weights as W
    from hpcalign.engines.megatron.checkpoint import load_dist_checkpoint, read_meta
    from hpcalign.engines.megatron.model import GptShape, build_gpt_model
    from hpcalign.engines.megatron.parallel import init_model_parallel
    from hpcalign.models.hf import copy_model_files

    meta = read_meta(src)
    _fresh(dst)
    shape = GptShape(**meta["shape"])
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[meta["dtype"]]
    init_model_parallel(1, 1, seed=0)
    model = build_gpt_model(shape, tp=1, pp=1, dtype=dtype, padded_vocab=meta["padded_vocab"])
    load_dist_checkpoint(model, src)
    state = {k: v for k, v in model.state_dict().items() if "_extra_state" not in k}
    os.makedirs(dst, mode=0o700, exist_ok=True)
    save_file(W.global_to_hf(state, shape), os.path.join(dst, "model.safetensors"),
              metadata={"format": "pt"})
    copy_model_files(os.path.join(src, "hf"), dst)


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.direction == "hf-to-megatron":
        hf_to_megatron(args.src, args.dst, args.tp, args.pp)
        print(f"wrote {args.dst} (megatron dist checkpoint, padded for tp={args.tp}, pp={args.pp})")
    else:
        megatron_to_hf(args.src, args.dst)
        print(f"wrote {args.dst} (HF safetensors)")
    return 0
