"""Small frame helpers of the synthetic generator: rotations, 4x4 poses, quaternions, deterministic tokens."""

from __future__ import annotations

import hashlib

import numpy as np

from shards.geometry import quaternion_to_matrix


def _rz(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _ry(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _rx(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def matrix_to_quaternion(rot: np.ndarray) -> list[float]:
    """(3, 3) rotation matrix -> [w, x, y, z] unit quaternion with w >= 0 (Shepperd's method)."""
    m = np.asarray(rot, dtype=np.float64)
    if m.shape != (3, 3):
        raise ValueError(f"matrix_to_quaternion: expected (3, 3), got {m.shape}")
    tr = np.trace(m)
    if tr > 0:
        s = 2.0 * np.sqrt(tr + 1.0)
        q = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = 2.0 * np.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
        q = [(m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
    elif m[1, 1] > m[2, 2]:
        s = 2.0 * np.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
        q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s]
    else:
        s = 2.0 * np.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
        q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s]
    qa = np.asarray(q)
    qa = qa / np.linalg.norm(qa)
    if qa[0] < 0:
        qa = -qa
    return [float(x) for x in qa]


def _pose(rot: np.ndarray, trans: np.ndarray) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = rot
    out[:3, 3] = trans
    return out


def _record_matrix(rec: dict) -> np.ndarray:
    return _pose(quaternion_to_matrix(rec["rotation"]), np.asarray(rec["translation"], np.float64))


class _Tokens:
    """Deterministic 32-hex tokens derived from the seed and a running counter."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.count = 0

    def __call__(self, kind: str) -> str:
        self.count += 1
        return hashlib.md5(f"pop3d-synthetic|{self.seed}|{kind}|{self.count}".encode()).hexdigest()
