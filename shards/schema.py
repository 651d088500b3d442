"""On-disk schema of the nuScenes WebDataset shards: field names, encoders and decoders.

One sample = one keyframe (``sample`` record of nuScenes). Its WebDataset key is the sample token
(32 hex characters, no dots), and every field is one tar member ``<token>.<field>``:

============================  ====================================================================
member                        content
============================  ====================================================================
``meta.json``                 UTF-8 JSON, sorted keys: schema version, dataset version, split,
                              scene name/token, sample token, timestamp, camera order, image size
                              per camera, source file names, ``has_lidarseg``
``cam_front.jpg`` ... (x6)    the camera JPEG, byte for byte the source file (never re-encoded);
                              one member per camera in :data:`CAMERAS` order
``lidar.npy``                 float32 (N, 4): x, y, z, intensity of the keyframe LIDAR_TOP sweep in
                              the LiDAR frame (columns 0..3 of the ``.pcd.bin``), row order kept
``lidarseg.npy``              uint8 (N,): raw lidarseg ids 0..31 (only when the split has lidarseg)
``cam_intrinsic.npy``         float64 (6, 3, 3): K per camera
``lidar2cam.npy``             float64 (6, 4, 4): LiDAR(t_lidar) -> camera(t_cam) transform per camera,
                              ego motion between the two timestamps included
``lidar2ego.npy``             float64 (4, 4): LiDAR -> ego body frame of the keyframe (its LIDAR_TOP
                              ``calibrated_sensor``; schema 3, every sample): the frame of Occ3D's voxels
``eval_gt.npy``               uint8 (X, Y, Z): the ray-cast evaluation GT
                              (:func:`shards.geometry.raycast_eval_gt`) of the grid that ``meta.json``
                              records as ``eval_gt_grid`` (schema 3; only for samples with lidarseg of
                              the splits chosen with ``build_shards.py --eval-gt-splits``)
``voxel_label.npy``           uint8 (X, Y, Z): the voxel majority label
                              (:func:`shards.geometry.voxel_majority_label`) of the same grid; present
                              exactly when ``eval_gt.npy`` is
``checksums.json``            last member: ``{"members": {field: {"bytes", "sha256"}}}`` of every
                              other member of the sample (schema version 2); the manifest lists,
                              per shard, every sample key with the sha256 of this member
============================  ====================================================================

``meta.json`` of schema 3 also holds ``eval_gt_grid``: ``{"pc_min": [3 floats], "pc_max": [3 floats],
"size": [X, Y, Z]}`` of the stored evaluation GT, or ``null`` where none is stored; the manifest records
the same per split (``splits.<split>.eval_gt_grid``). The loader uses the stored arrays when that grid is
the requested one and ray-casts otherwise (:mod:`shards.evalgt`). Readers accept schema 2 (no stored GT:
always computed) and 3; the writer writes 3.

Arrays are stored with ``np.save`` (``.npy`` format 1.0, little endian) and read with
``np.load(allow_pickle=False)``: no pickle anywhere. ``.npz`` is avoided on purpose because numpy
stamps the current time into its zip entries, which would break byte-for-byte determinism.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import numpy as np

from shards.errors import SampleDecodeError
from shards.geometry import CAMERAS  # camera order of every per-camera array and JPEG member

#: Bump when a field is added, removed or changes meaning. The writer refuses to mix versions and the
#: loader refuses shards of another version. 2: per-sample ``checksums.json`` + per-shard key index.
#: 3: stored evaluation GT (``eval_gt.npy`` + ``voxel_label.npy``, ``meta.json``'s ``eval_gt_grid``) and the
#: LiDAR -> ego calibration (``lidar2ego.npy``) of every sample.
SCHEMA_VERSION: int = 3

#: Schema versions the readers accept (a version-2 set reads as before; its eval GT is computed on the fly).
READABLE_SCHEMA_VERSIONS: frozenset[int] = frozenset({2, 3})

#: Tar-member extension (WebDataset field name) of each camera's JPEG, in :data:`CAMERAS` order.
CAMERA_FIELDS: tuple[str, ...] = tuple(f"{c.lower()}.jpg" for c in CAMERAS)

META_FIELD = "meta.json"
LIDAR_FIELD = "lidar.npy"
LIDARSEG_FIELD = "lidarseg.npy"
INTRINSIC_FIELD = "cam_intrinsic.npy"
LIDAR2CAM_FIELD = "lidar2cam.npy"
LIDAR2EGO_FIELD = "lidar2ego.npy"
EVAL_GT_FIELD = "eval_gt.npy"
VOXEL_LABEL_FIELD = "voxel_label.npy"
CHECKSUM_FIELD = "checksums.json"
#: ``meta.json`` key of the grid the stored evaluation GT was computed for (schema 3).
EVAL_GT_GRID_KEY = "eval_gt_grid"

#: Fixed member order inside a sample (``lidarseg.npy`` is absent where the split has no lidarseg, the two
#: stored evaluation-GT members where none is stored).
FIELD_ORDER: tuple[str, ...] = (
    META_FIELD,
    *CAMERA_FIELDS,
    LIDAR_FIELD,
    LIDARSEG_FIELD,
    INTRINSIC_FIELD,
    LIDAR2CAM_FIELD,
    LIDAR2EGO_FIELD,
    EVAL_GT_FIELD,
    VOXEL_LABEL_FIELD,
    CHECKSUM_FIELD,
)

#: Fields every sample must have (``checksums.json`` too: :func:`shards.verify.verify_sample` checks it, with
#: the hint to rebuild schema-1 shards; ``lidar2ego.npy``: :func:`decode_arrays`, from schema 3 on).
REQUIRED_FIELDS: frozenset[str] = frozenset(
    f for f in FIELD_ORDER
    if f not in (LIDARSEG_FIELD, LIDAR2EGO_FIELD, EVAL_GT_FIELD, VOXEL_LABEL_FIELD, CHECKSUM_FIELD))

#: File name of the per-directory manifest and of the progress folder used for resuming.
MANIFEST_NAME = "manifest.json"
PROGRESS_DIR = ".progress"


def shard_name(split: str, index: int) -> str:
    """Return the file name of shard ``index`` of ``split``, e.g. ``train-000003.tar``."""
    return f"{split}-{index:06d}.tar"


def encode_npy(array: np.ndarray) -> bytes:
    """Serialise an array with ``np.save`` (no pickle); deterministic bytes for equal arrays."""
    arr = np.ascontiguousarray(array)
    if arr.dtype == object:
        raise TypeError("object arrays cannot be stored (pickle is not allowed)")
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    """Inverse of :func:`encode_npy` (``allow_pickle=False``)."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def encode_json(obj: dict[str, Any]) -> bytes:
    """Serialise a JSON object deterministically (sorted keys, compact separators, UTF-8)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def decode_json(data: bytes) -> dict[str, Any]:
    """Inverse of :func:`encode_json`."""
    return json.loads(data.decode("utf-8"))


def encode_sample(sample: dict[str, Any]) -> list[tuple[str, bytes]]:
    """Turn a reader sample dict into the ordered list of (field, bytes) tar members.

    Args:
        sample: dict from :func:`shards.reader.load_sample` with keys ``token``, ``meta`` (dict),
            ``images`` (list of 6 JPEG ``bytes`` in :data:`CAMERAS` order), ``points`` float32 (N, 4),
            ``lidarseg`` uint8 (N,) or None, ``cam_intrinsic`` (6, 3, 3), ``lidar2cam`` (6, 4, 4),
            ``lidar2ego`` (4, 4), and
            optionally ``eval_gt`` / ``voxel_label`` uint8 (X, Y, Z) (both or neither; the grid goes in
            ``meta["eval_gt_grid"]``).

    Returns:
        ``[(field, payload), ...]`` in :data:`FIELD_ORDER`.
    """
    images = sample["images"]
    if len(images) != len(CAMERAS):
        raise ValueError(f"sample {sample['token']}: expected {len(CAMERAS)} images, got {len(images)}")
    out: list[tuple[str, bytes]] = [(META_FIELD, encode_json(sample["meta"]))]
    out += [(f, bytes(b)) for f, b in zip(CAMERA_FIELDS, images)]
    out.append((LIDAR_FIELD, encode_npy(np.asarray(sample["points"], dtype=np.float32))))
    if sample.get("lidarseg") is not None:
        out.append((LIDARSEG_FIELD, encode_npy(np.asarray(sample["lidarseg"], dtype=np.uint8))))
    out.append((INTRINSIC_FIELD, encode_npy(np.asarray(sample["cam_intrinsic"], dtype=np.float64))))
    out.append((LIDAR2CAM_FIELD, encode_npy(np.asarray(sample["lidar2cam"], dtype=np.float64))))
    out.append((LIDAR2EGO_FIELD, encode_npy(np.asarray(sample["lidar2ego"], dtype=np.float64))))
    stored = [sample.get("eval_gt") is not None, sample.get("voxel_label") is not None]
    if any(stored):
        if not all(stored) or not sample["meta"].get(EVAL_GT_GRID_KEY):
            raise ValueError(f"sample {sample['token']}: eval_gt and voxel_label go together, with meta "
                             f"{EVAL_GT_GRID_KEY}")
        out.append((EVAL_GT_FIELD, encode_npy(np.asarray(sample["eval_gt"], dtype=np.uint8))))
        out.append((VOXEL_LABEL_FIELD, encode_npy(np.asarray(sample["voxel_label"], dtype=np.uint8))))
    out.append((CHECKSUM_FIELD, encode_checksums(out)))
    return out


def encode_checksums(members: list[tuple[str, bytes]]) -> bytes:
    """The ``checksums.json`` payload of a sample's other members: size and sha256 of each."""
    return encode_json({"members": {f: {"bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()}
                                    for f, b in members}})


def check_fields(fields: dict[str, Any], where: str) -> None:
    """Raise ``ValueError`` naming ``where`` when a raw WebDataset sample misses a required field."""
    missing = sorted(REQUIRED_FIELDS - set(fields))
    if missing:
        raise ValueError(f"{where}: sample {fields.get('__key__', '?')} misses field(s) {missing}")


def _decode_member(fields: dict[str, Any], field: str, decode: Any) -> Any:
    try:
        return decode(fields[field])
    except Exception as exn:
        where = fields.get("__url__", "?")
        raise SampleDecodeError(f"{where}: sample {fields.get('__key__', '?')}: member {field}: cannot be "
                                f"decoded ({type(exn).__name__}: {exn})") from exn


def decode_arrays(fields: dict[str, Any]) -> dict[str, Any]:
    """Decode the non-image fields of a raw WebDataset sample (``{field: bytes}``).

    Returns:
        dict with ``token`` (str), ``meta`` (dict), ``jpegs`` (list of 6 ``bytes``),
        ``points`` float32 (N, 4), ``lidarseg`` uint8 (N,) or None,
        ``cam_intrinsic`` float64 (6, 3, 3), ``lidar2cam`` float64 (6, 4, 4), ``lidar2ego`` float64 (4, 4)
        or None (schema-2 shards).

    Raises:
        SampleDecodeError: naming shard (``__url__``), key and member, for undecodable bytes, a meta.json
            without ``sample_token``/``img_hw``, or a schema-3 sample without ``lidar2ego.npy``.
    """
    meta = _decode_member(fields, META_FIELD, decode_json)
    if not isinstance(meta, dict) or not isinstance(meta.get("sample_token"), str) or "img_hw" not in meta:
        raise SampleDecodeError(f"{fields.get('__url__', '?')}: sample {fields.get('__key__', '?')}: member "
                                f"{META_FIELD}: no sample_token / img_hw")
    seg = fields.get(LIDARSEG_FIELD)
    n_cam = len(CAMERAS)
    if LIDAR2EGO_FIELD not in fields and meta.get("schema_version", 2) >= 3:
        raise SampleDecodeError(f"{fields.get('__url__', '?')}: sample {fields.get('__key__', '?')}: member "
                                f"{LIDAR2EGO_FIELD}: missing (a schema-3 sample has it); rebuild the split with "
                                "scripts/build_shards.py")
    return {
        "token": meta["sample_token"],
        "meta": meta,
        "jpegs": [fields[f] for f in CAMERA_FIELDS],
        "points": _decode_member(fields, LIDAR_FIELD, _npy_of(np.float32, (None, 4))),
        "lidarseg": _decode_member(fields, LIDARSEG_FIELD, _npy_of(np.uint8, (None,))) if seg is not None else None,
        "cam_intrinsic": _decode_member(fields, INTRINSIC_FIELD, _npy_of(np.float64, (n_cam, 3, 3))),
        "lidar2cam": _decode_member(fields, LIDAR2CAM_FIELD, _npy_of(np.float64, (n_cam, 4, 4))),
        "lidar2ego": (_decode_member(fields, LIDAR2EGO_FIELD, _npy_of(np.float64, (4, 4)))
                      if LIDAR2EGO_FIELD in fields else None),
    }


def _npy_of(dtype: Any, shape: tuple[int | None, ...]) -> Any:
    """A decoder of ``.npy`` bytes that also checks dtype and shape (None: any length)."""

    def decode(data: bytes) -> np.ndarray:
        arr = decode_npy(data)
        ok = arr.dtype == dtype and arr.ndim == len(shape) and all(
            want is None or have == want for have, want in zip(arr.shape, shape))
        if not ok:
            raise ValueError(f"expected {np.dtype(dtype).name} {shape}, got {arr.dtype.name} {arr.shape}")
        return arr

    return decode
