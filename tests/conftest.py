"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from shards.synthetic import make_synthetic_nuscenes


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic nuScenes dataroot (v1.0-mini with lidarseg + v1.0-test), generated once per session."""
    return make_synthetic_nuscenes(tmp_path_factory.mktemp("nuscenes"))


# ---------------------------------------------------------------------------------------------------------
# Shards of the synthetic dataset (owned by shards/writer.py; built once per session)
# ---------------------------------------------------------------------------------------------------------

#: Arguments of the session shard build (tests read them back from its manifest.json).
SHARD_BUILD_ARGS = {
    "versions": ["v1.0-mini", "v1.0-test"],
    "splits": ["train", "val", "test"],
    "samples_per_shard": 2,
}


@pytest.fixture(scope="session")
def shard_root(synthetic_root, tmp_path_factory) -> str:
    """Directory with ``<split>-NNNNNN.tar`` + ``manifest.json`` of the synthetic dataset.

    train/val come from ``v1.0-mini`` (with lidarseg), test from ``v1.0-test`` (no lidarseg); 2 samples per
    shard. Read-only for tests: copy it before modifying anything.
    """
    from shards.writer import build_shards

    out = tmp_path_factory.mktemp("shards")
    build_shards(
        str(synthetic_root),
        SHARD_BUILD_ARGS["versions"],
        SHARD_BUILD_ARGS["splits"],
        str(out),
        workers=1,
        samples_per_shard=SHARD_BUILD_ARGS["samples_per_shard"],
        progress=False,
    )
    return str(out)
