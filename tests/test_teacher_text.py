"""Text embeddings: the original prompt set, the recipe, the script and the released-file converter."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from teacher.checkpoint import convert_zeroshot_weights, load_text_embeddings
from teacher.text import PROMPT_TEMPLATES, build_text_model, encode_phrases, prompt_set

ROOT = Path(__file__).resolve().parents[1]
# cls2idx as printed in POP-3D's MaskCLIP/tools/maskclip_utils/prompt_engineering.py
ORIGINAL_CLS2IDX = [
    0, 1, 1, 1, 1, 1, 1, 2, 3, 4, 5, 5, 6, 7, 8, 9, 9, 9, 9, 10, 10, 10, 11, 11, 11, 11, 11, 12, 13, 14, 15,
    16, 17, 17, 17, 17, 17, 17, 17, 17, 17, 17, 18, 18, 19, 19, 20, 20, 20, 20, 21, 21, 21, 22, 22, 22, 22,
    23, 23, 23, 23, 23, 24, 24, 25, 25, 25, 25, 25, 25, 26, 26, 26, 27, 27, 27, 27, 27, 28, 28, 28, 28, 28,
    28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 29, 30, 30, 30, 30, 30, 30, 30, 31,
]
SMALL = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 16, "patch_size": 16, "head_width": 8},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}


def test_prompt_set_is_the_original():
    phrases, ids = prompt_set("nuscenes_subcategories")
    assert len(phrases) == 102 == len(set(phrases)) and ids == ORIGINAL_CLS2IDX
    assert len(PROMPT_TEMPLATES) == 85 and all(t.count("{}") == 1 for t in PROMPT_TEMPLATES)
    assert phrases[7] == "Adult." and phrases[-1].startswith("The vehicle on which")


def test_recipe_normalise_average_normalise():
    torch.manual_seed(0)
    model = build_text_model(None, model_cfg=SMALL)
    templates = PROMPT_TEMPLATES[:3]
    emb = encode_phrases(model, ["car", "tree"], templates)
    import open_clip
    tok = open_clip.get_tokenizer("ViT-B-16")
    with torch.no_grad():
        e = model.encode_text(tok([t.format("tree") for t in templates]))
    e = torch.nn.functional.normalize(e, dim=-1).mean(0)
    assert emb.shape == (2, 16) and torch.allclose(emb[1], e / e.norm(), atol=1e-6)
    assert torch.allclose(emb.norm(dim=1), torch.ones(2))


def test_script_random_and_released_converter(tmp_path):
    out = tmp_path / "text.safetensors"
    r = subprocess.run([sys.executable, str(ROOT / "scripts/text_embeddings.py"), "--random", "--small-random-model",
                        "--out", str(out), "--device", "cpu", "--batch-size", "2048"],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    emb, cls2idx, meta = load_text_embeddings(out)
    assert emb.shape == (102, 512) and cls2idx.tolist() == ORIGINAL_CLS2IDX and meta["prompt_set"]
    # POP-3D's released format: tuple (tensor [102, 512], cls2idx list)
    torch.save((emb.clone(), list(ORIGINAL_CLS2IDX)), tmp_path / "zeroshot_weights.pth")
    assert convert_zeroshot_weights(tmp_path / "zeroshot_weights.pth", tmp_path / "z.safetensors", quiet=True) \
        == (102, 512)
    emb2, idx2, _ = load_text_embeddings(tmp_path / "z.safetensors")
    assert torch.equal(emb2, emb) and torch.equal(idx2, cls2idx)
