#!/usr/bin/env python
"""Free-text 3D queries on one sample: an interactive HTML viewer (offline) and a PNG of the similarities.

    python scripts/query.py --config configs/pop3d_12ep.yaml --weights runs/pop3d/student.safetensors \
        --clip-weights ckpts/clip_vit_b16.safetensors --text "a parked car" --text "a tree" --index 0 --out q.html
    python scripts/query.py --config configs/tiny.yaml --weights runs/tiny/student.safetensors \
        --random-text-embeddings --text "a parked car" --token <sample token> --out runs/tiny/query.html

Every occupied voxel is coloured by the cosine similarity of its predicted CLIP feature with each query (the
text through the local open_clip text tower, as typed; ``--prompt-templates`` averages POP-3D's 85 templates).
Writes OUT (.html, self-contained) and OUT with .png (or --png). Bad input: one line on stderr, exit 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML run config (configs/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    p.add_argument("--weights", required=True, help="student .safetensors")
    p.add_argument("--text", action="append", required=True, help="a query (repeatable)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--index", type=int, help="sample number in shard order")
    which.add_argument("--token", help="sample token")
    p.add_argument("--split", help="split to read (default: data.val_split)")
    p.add_argument("--clip-weights", help="local open_clip ViT-B-16 weight file for the text tower")
    p.add_argument("--random-text-embeddings", action="store_true", help="random query vectors (tests only)")
    p.add_argument("--prompt-templates", action="store_true", help="average each query over POP-3D's templates")
    p.add_argument("--all-voxels", action="store_true", help="show every voxel, not only the occupied ones")
    p.add_argument("--out", required=True, help="HTML file to write")
    p.add_argument("--png", help="PNG to write (default: OUT with .png)")
    p.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    from pop3d.query import QueryError, run_query

    try:
        html, png = run_query(args.config, args.weights, args.text, args.out, index=args.index, token=args.token,
                              split=args.split, clip_weights=args.clip_weights,
                              random_text=args.random_text_embeddings, templates=args.prompt_templates,
                              all_voxels=args.all_voxels, png=args.png, device=args.device, overrides=args.set)
    except QueryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {Path(html).resolve()}\nwrote {Path(png).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
