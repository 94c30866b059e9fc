"""Convert the official W+ adapter files into this pack's safetensors: the adapter (wplus_adapter.bin or
wplus_adapter_stage1.bin -> wplus/1) and the e4e encoder (e4e_ffhq_encode.pt -> e4e/1, without its StyleGAN
decoder, which the nodes do not use).

    python tools/convert_wplus.py --adapter wplus_adapter.bin --out ComfyUI/models/wplus/wplus_adapter.safetensors
    python tools/convert_wplus.py --e4e e4e_ffhq_encode.pt --out ComfyUI/models/wplus/e4e_ffhq_encode.safetensors

Both are read tensors-only (nothing in the files runs); the official files load in the nodes as they are too.
"""

import argparse
import sys

if not __package__:  # run as a script: _bootstrap, beside it, imports this checkout as `comfyui_idadapter`
    import _bootstrap  # noqa: F401

import torch  # noqa: E402

from comfyui_idadapter.nodes.arch.e4e import convert_official_e4e  # noqa: E402
from comfyui_idadapter.nodes.arch.wplus import convert_official_wplus  # noqa: E402
from comfyui_idadapter.nodes.errors import PackError  # noqa: E402

DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--adapter", help="the official W+ adapter file (.bin)")
    source.add_argument("--e4e", help="the official e4e encoder (e4e_ffhq_encode.pt)")
    parser.add_argument("--out", required=True, help="the safetensors file to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="fp32 (default, lossless) or fp16")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return parser.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    if args.adapter:
        weights = convert_official_wplus(args.adapter, args.out, args.overwrite, DTYPES[args.dtype])
        report = (f"wrote {args.out} (wplus/1, {args.dtype}): W+ adapter for {weights.config.family}, "
                  f"{len(weights.config.blocks)} cross-attention layers")
    else:
        convert_official_e4e(args.e4e, args.out, args.overwrite, DTYPES[args.dtype])
        report = f"wrote {args.out} (e4e/1, {args.dtype}): the e4e encoder and latent_avg"
    print(report)
    return report


def cli(argv=None) -> int:
    try:
        main(argv)
    except PackError as exc:  # a missing, damaged or foreign file, or an existing output: the message says what to do
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
