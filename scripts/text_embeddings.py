#!/usr/bin/env python
"""Text embeddings for zero-shot evaluation -> .safetensors (``embeddings`` [K, 512], ``cls2idx`` int64 [K]).

    python scripts/text_embeddings.py --clip-weights open_clip_model.safetensors --out text.safetensors
    python scripts/text_embeddings.py --from-released zeroshot_weights.pth --out text.safetensors
    python scripts/text_embeddings.py --random --out /tmp/text_random.safetensors   # tests / quick start

The CLIP file must be LOCAL (open_clip ViT-B-16 names; convert an OpenAI archive with
``teacher.checkpoint.convert_clip_weights``). Prompt set: POP-3D's 102 nuScenes sub-category phrases x 85
templates (teacher/text.py).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from teacher.checkpoint import convert_zeroshot_weights, save_text_embeddings
from teacher.text import PROMPT_SETS, PROMPT_TEMPLATES, build_text_model, encode_phrases, prompt_set
from teacher.weights_io import UNSAFE_FLAG


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--clip-weights", help="local open_clip ViT-B-16 weight file (.safetensors/.bin)")
    src.add_argument("--from-released", help="POP-3D's zeroshot_weights.pth (tuple (tensor, cls2idx))")
    src.add_argument("--random", action="store_true", help="random text tower (tests only; meaningless output)")
    ap.add_argument("--out", required=True, help="output .safetensors")
    ap.add_argument("--prompt-set", default="nuscenes_subcategories", choices=PROMPT_SETS)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--small-random-model", action="store_true", help="with --random: a tiny tower (fast)")
    ap.add_argument(UNSAFE_FLAG, dest="unsafe", action="store_true",
                    help="allow full unpickling of --from-released (only for files you trust)")
    args = ap.parse_args(argv)
    if not args.out.endswith(".safetensors"):
        ap.error(f"--out {args.out}: must end with .safetensors")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    for flag, path in (("--clip-weights", args.clip_weights), ("--from-released", args.from_released)):
        if path and not Path(path).is_file():
            print(f"error: {path} ({flag}): no such file; nothing is downloaded: get the file (README 'Weights'), "
                  "or pass --random for a pipeline test", file=sys.stderr)
            return 2

    if args.from_released:
        _k, _d = convert_zeroshot_weights(args.from_released, args.out, allow_unsafe_pickle=args.unsafe)
        return 0
    cfg = None
    if args.random:
        logging.getLogger("text_embeddings").warning("RANDOM text tower: the embeddings are meaningless (tests / quick start only)")
        if args.small_random_model:
            cfg = {"embed_dim": 512, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
                       "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
        torch.manual_seed(0)
    model = build_text_model(None if args.random else args.clip_weights, model_cfg=cfg)
    phrases, cls2idx = prompt_set(args.prompt_set)
    emb = encode_phrases(model, phrases, PROMPT_TEMPLATES, batch_size=args.batch_size, device=args.device,
                         progress=True)
    save_text_embeddings(args.out, emb, torch.tensor(cls2idx, dtype=torch.int64), {
        "prompt_set": args.prompt_set, "num_templates": len(PROMPT_TEMPLATES), "phrases": json.dumps(phrases),
        "model": "ViT-B-16", "source": "random" if args.random else Path(args.clip_weights).name,
    })
    print(f"[text] {len(phrases)} phrases x {len(PROMPT_TEMPLATES)} templates -> {list(emb.shape)} "
          f"+ cls2idx -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
