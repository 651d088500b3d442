"""Text embeddings for zero-shot evaluation: prompt templates x class phrases through open_clip's text tower.

The prompt set ``nuscenes_subcategories`` is POP-3D's (pipeline.md §4.1): 102 phrases, each tied to a raw
nuScenes lidarseg id 0..31 (``cls2idx``), and 85 templates (the 80 CLIP ImageNet templates + 5 scene
templates). Recipe per phrase: encode the 85 sentences, L2-normalise each, average, L2-normalise again
-> [K, 512] float32. The original ran the text tower in fp16 on CUDA; we run fp32 (differences ~1e-3).
"""
from __future__ import annotations

import os

import torch

# raw lidarseg id, lidarseg name, phrases (in the original's order; the flattened order defines rows)
NUSCENES_SUBCATEGORIES: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (0, "noise", (("Any lidar return that does not correspond to a physical object, such as dust, vapor, noise, "
                  "fog, raindrops, smoke and reflections."),)),
    (1, "animal", ("animal", "cat", "dog", "rat", "deer", "bird")),
    (2, "human.pedestrian.adult", ("Adult.",)),
    (3, "human.pedestrian.child", ("Child.",)),
    (4, "human.pedestrian.construction_worker", ("Construction worker",)),
    (5, "human.pedestrian.personal_mobility", ("skateboard", "segway")),
    (6, "human.pedestrian.police_officer", ("Police officer.",)),
    (7, "human.pedestrian.stroller", ("Stroller",)),
    (8, "human.pedestrian.wheelchair", ("Wheelchair",)),
    (9, "movable_object.barrier", ("Temporary road barrier to redirect traffic.", "concrete barrier",
                                   "metal barrier", "water barrier")),
    (10, "movable_object.debris", ("Movable object that is left on the driveable surface.", "tree branch",
                                   "full trash bag")),
    (11, "movable_object.pushable_pullable", ("Object that a pedestrian may push or pull.", "dolley",
                                              "wheel barrow", "garbage-bin", "shopping cart")),
    (12, "movable_object.trafficcone", ("traffic cone.",)),
    (13, "static_object.bicycle_rack", ("Area or device intended to park or secure the bicycles in a row.",)),
    (14, "vehicle.bicycle", ("Bicycle",)),
    (15, "vehicle.bus.bendy", ("Bendy bus",)),
    (16, "vehicle.bus.rigid", ("Rigid bus",)),
    (17, "vehicle.car", ("Vehicle designed primarily for personal use.", "car", "vehicle", "sedan", "hatch-back",
                         "wagon", "van", "mini-van", "SUV", "jeep")),
    (18, "vehicle.construction", ("Vehicle designed for construction.", "crane")),
    (19, "vehicle.emergency.ambulance", ("ambulance", "ambulance vehicle")),
    (20, "vehicle.emergency.police", ("police vehicle", "police car", "police bicycle", "police motorcycle")),
    (21, "vehicle.motorcycle", ("motorcycle", "vespa", "scooter")),
    (22, "vehicle.trailer", ("trailer", "truck trailer", "car trailer", "bike trailer")),
    (23, "vehicle.truck", ("Vehicle primarily designed to haul cargo.", "pick-up", "lorry", "truck",
                           "semi-tractor")),
    (24, "flat.driveable_surface", ("Paved surface that a car can drive.", "Unpaved surface that a car can drive.")),
    (25, "flat.other", ("traffic island", "delimiter", "rail track", "small stairs", "lake", "river")),
    (26, "flat.sidewalk", ("sidewalk", "pedestrian walkway", "bike path")),
    (27, "flat.terrain", ("grass", "rolling hill", "soil", "sand", "gravel")),
    (28, "static.manmade", ("man-made structure", "building", "wall", "guard rail", "fence", "pole", "drainage",
                            "hydrant", "flag", "banner", "street sign", "electric circuit box", "traffic light",
                            "parking meter", "stairs")),
    (29, "static.other", (("Points in the background that are not distinguishable, or objects that do not match "
                          "any of the above labels."),)),
    (30, "static.vegetation", ("bushes", "bush", "plants", "plant", "potted plant", "tree", "trees")),
    (31, "vehicle.ego", (("The vehicle on which the cameras, radar and lidar are mounted, that is sometimes "
                         "visible at the bottom of the image."),)),
)

PROMPT_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.", "there is a {} in the scene.", "there is the {} in the scene.",
    "this is a {} in the scene.", "this is the {} in the scene.", "this is one {} in the scene.",
)

PROMPT_SETS = ("nuscenes_subcategories",)


def prompt_set(name: str = "nuscenes_subcategories") -> tuple[list[str], list[int]]:
    """(phrases [K], cls2idx [K] raw lidarseg ids) of a prompt set; K = 102 for nuscenes_subcategories."""
    if name != "nuscenes_subcategories":
        raise ValueError(f"unknown prompt set {name!r}; available: {PROMPT_SETS}")
    phrases, ids = [], []
    for raw_id, _, names in NUSCENES_SUBCATEGORIES:
        phrases += list(names)
        ids += [raw_id] * len(names)
    return phrases, ids


def build_text_model(clip_weights: str | os.PathLike | None, model_name: str = "ViT-B-16",
                     model_cfg: dict | None = None) -> torch.nn.Module:
    """open_clip CLIP model with weights from a LOCAL file (or random / a small ``model_cfg`` for tests)."""
    import open_clip

    if model_cfg:
        from open_clip.model import CLIP
        return CLIP(**model_cfg).eval()
    if clip_weights is not None and not os.path.isfile(clip_weights):
        raise FileNotFoundError(f"{clip_weights}: CLIP weight file not found (only local files are used)")
    return open_clip.create_model(model_name, pretrained=None if clip_weights is None else str(clip_weights)).eval()


@torch.no_grad()
def encode_phrases(model: torch.nn.Module, phrases: list[str], templates: tuple[str, ...] = PROMPT_TEMPLATES,
                   tokenizer=None, batch_size: int = 256, device: str | torch.device = "cpu",
                   progress: bool = False) -> torch.Tensor:
    """[K] phrases -> float32 [K, D]: per template L2-normalised, averaged, re-normalised.

    tokenizer: callable list[str] -> (n, context) int tensor; default ``open_clip.get_tokenizer('ViT-B-16')``
    (context 77). The token context is cut to the model's if it is shorter (small test models).
    """
    import open_clip

    tok = tokenizer or open_clip.get_tokenizer("ViT-B-16")
    model = model.to(device).eval()
    ctx = int(getattr(model, "context_length", 77))
    sentences = [t.format(p) for p in phrases for t in templates]
    embs = []
    it = range(0, len(sentences), batch_size)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="text tower", unit="batch")
    for s in it:
        tokens = tok(sentences[s:s + batch_size])[:, :ctx].to(device)
        e = model.encode_text(tokens).float()
        embs.append(e / e.norm(dim=-1, keepdim=True))
    e = torch.cat(embs).reshape(len(phrases), len(templates), -1).mean(1)
    return (e / e.norm(dim=-1, keepdim=True)).cpu()
