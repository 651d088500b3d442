#!/usr/bin/env python
"""Convert official .pth checkpoints to safetensors, once. Run-time code reads safetensors only.

    python scripts/convert_weights.py pop3d  pop3d_weights.pth           ckpts/pop3d.safetensors --config configs/pop3d_12ep.yaml
    python scripts/convert_weights.py fcos3d r101_dcn_fcos3d_pretrain.pth ckpts/fcos3d_r101_dcn.safetensors --config configs/pop3d_12ep.yaml
    python scripts/convert_weights.py maskclip_plus maskclip_plus_vit16_deeplabv2_r101-d8_512x512_8k_coco-stuff164k.pth ckpts/maskclip_plus.safetensors
    python scripts/convert_weights.py clip ViT-B-16.pt ckpts/clip_vit_b16.safetensors --unsafe-allow-pickle-code-execution
    python scripts/convert_weights.py zeroshot zeroshot_weights.pth ckpts/zeroshot_text.safetensors

(`clip`: an open_clip or OpenAI ViT-B/16 file, for the MaskCLIP ViT teacher and scripts/text_embeddings.py;
OpenAI's .pt is a TorchScript archive, which only loads with full unpickling.)

Pickle is read with torch.load(weights_only=True). A file that needs full unpickling is refused unless you pass
--unsafe-allow-pickle-code-execution (only for files from a source you trust). A file whose keys or shapes do
not fit the chosen configuration is refused, naming the first offending keys.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from teacher.weights_io import UNSAFE_FLAG, CheckpointError

KINDS = ("pop3d", "fcos3d", "maskclip_plus", "clip", "zeroshot")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=KINDS, help="what the source file is")
    parser.add_argument("src", type=Path, help="official .pth file")
    parser.add_argument("dst", type=Path, help="output .safetensors")
    parser.add_argument("--config", help="run config whose `model` section the student weights must fit "
                        "(pop3d, fcos3d; default: the paper configuration)")
    parser.add_argument(UNSAFE_FLAG, dest="unsafe", action="store_true",
                        help="allow full unpickling (can execute code from the file)")
    args = parser.parse_args(argv)
    if args.dst.suffix != ".safetensors":
        print(f"error: {args.dst}: the output must end in .safetensors", file=sys.stderr)
        return 2
    try:
        if args.kind in ("pop3d", "fcos3d"):
            from pop3d.checkpoint import convert_fcos3d_checkpoint, convert_pop3d_checkpoint
            from pop3d.config import load_config
            from pop3d.model.config import StudentConfig

            model_cfg = load_config(args.config).model if args.config else StudentConfig()
            convert = convert_pop3d_checkpoint if args.kind == "pop3d" else convert_fcos3d_checkpoint
            convert(args.src, args.dst, model_cfg, allow_unsafe_pickle=args.unsafe)
        elif args.kind == "maskclip_plus":
            from teacher.checkpoint import convert_maskclip_plus

            convert_maskclip_plus(args.src, args.dst, allow_unsafe_pickle=args.unsafe)
        elif args.kind == "clip":
            from teacher.checkpoint import convert_clip_weights

            convert_clip_weights(args.src, args.dst, allow_unsafe_pickle=args.unsafe)
        else:
            from teacher.checkpoint import convert_zeroshot_weights

            convert_zeroshot_weights(args.src, args.dst, allow_unsafe_pickle=args.unsafe)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
