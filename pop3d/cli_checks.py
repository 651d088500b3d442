"""Checks the command-line scripts make BEFORE their work, so that input a user can get wrong ends in one line
that names the file or key and what to do (the scripts print ``error: <message>`` and exit 2).

Every check raises :class:`UserInputError` (a ``ValueError``); :func:`user_errors` is what the scripts catch:
it adds the project's own input errors (config, checkpoint, benchmark, shard data), whose messages already
name the file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


class UserInputError(ValueError):
    """Input a user can fix; the message names the file or key and what to do."""


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions the scripts turn into ``error: <message>`` + exit 2: this module's UserInputError and the
    project's own input errors, whose messages name the file (config, checkpoint, benchmark, shard data)."""
    from pop3d.config import ConfigError
    from shards.loader import ShardReadError
    from shards.reader import DataError
    from teacher.weights_io import CheckpointError

    errors: list[type[BaseException]] = [UserInputError, ConfigError, CheckpointError, DataError, ShardReadError]
    try:
        from pop3d.retrieval import BenchmarkError
        errors.append(BenchmarkError)
    except ImportError:  # pragma: no cover - the retrieval module is optional for eval
        pass
    return tuple(errors)


BUILD_SHARDS = "scripts/build_shards.py --dataroot <nuScenes folder> --version ... --splits {split} --out {shards}"


def require_file(path: str | os.PathLike, what: str, todo: str) -> Path:
    """``path`` must be a file; else UserInputError '<path> (<what>): no such file; <todo>'."""
    p = Path(path)
    if not p.is_file():
        raise UserInputError(f"{p} ({what}): no such file; {todo}")
    return p


def shard_splits(shards: str) -> list[str] | None:
    """Splits of a shard folder with a manifest; None when ``shards`` has no manifest (a glob, tar list...)."""
    manifest = Path(shards) / "manifest.json" if not str(shards).endswith(".json") else Path(shards)
    if not manifest.is_file():
        return None
    try:
        return list(json.loads(manifest.read_text())["splits"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserInputError(f"{manifest}: unreadable shard manifest ({exc}); rebuild the shards with "
                             f"scripts/build_shards.py") from exc


def require_split(shards: str, split: str, key: str = "data.shards", need_lidarseg: bool = False) -> int:
    """``shards`` must hold shards of ``split`` (with lidarseg labels when ``need_lidarseg``); returns their
    number (0 for remote URLs, not checked here). Otherwise UserInputError saying to build them with
    scripts/build_shards.py (or to point ``key`` elsewhere)."""
    from shards.loader import list_shards

    if "://" in str(shards) or str(shards).startswith("pipe:"):
        return 0  # remote shards: the loader reports what it cannot read
    todo = f"build them with {BUILD_SHARDS.format(split=split, shards=shards)}, or set {key}=<shard folder>"
    src = Path(shards)
    if not str(shards).endswith(".json") and not any(c in str(shards) for c in "*?[") and not src.is_dir():
        raise UserInputError(f"{shards} ({key}): no such shard folder; {todo}")
    try:
        paths, _ = list_shards(str(shards), split)
    except (ValueError, OSError, KeyError) as exc:
        raise UserInputError(f"{shards} ({key}): no {split!r} shards ({exc}); {todo}") from exc
    if not paths:
        raise UserInputError(f"{shards} ({key}): no {split!r} shards; {todo}")
    if need_lidarseg and shard_splits(shards) is not None:
        manifest = json.loads((src / "manifest.json" if src.is_dir() else src).read_text())
        if manifest["splits"][split].get("has_lidarseg") is False:
            raise UserInputError(f"{shards} ({key}): split {split!r} has no lidarseg labels (nuScenes test), so it "
                                 "cannot be evaluated; evaluate a split with labels (--split val)")
    return len(paths)


def _config_diff(weights: Path, model_config: dict | None) -> str | None:
    """'feature_dim 64 vs 512, ...' from the model config a training run stored in the weights' metadata."""
    if model_config is None:
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt", device="cpu") as f:
            stored = json.loads((f.metadata() or {}).get("model_config", "null"))
    except Exception:  # noqa: BLE001 - only a nicer message is at stake
        return None
    if not isinstance(stored, dict):
        return None
    diff = [f"{k} {stored[k]} vs {model_config.get(k)}" for k in stored
            if k in model_config and _plain(stored[k]) != _plain(model_config[k])]
    return ", ".join(diff[:6]) or None


def _plain(v):
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def require_student_weights(weights: str | os.PathLike) -> Path:
    """--weights must be an existing .safetensors file: a .pth says to convert it, a missing file what makes one."""
    w = Path(weights)
    if w.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        raise UserInputError(f"{w} (--weights): a PyTorch pickle, not safetensors; convert it once with "
                             f"scripts/convert_weights.py pop3d {w} {w.with_suffix('.safetensors')}")
    if not w.is_file():
        raise UserInputError(f"{w} (--weights): no such file; train one with scripts/train.py or convert the "
                             "released weights with scripts/convert_weights.py")
    return w


def load_student(cfg, weights: str | os.PathLike, config: str | os.PathLike):
    """:func:`pop3d.factory.load_student` (the student of ``cfg`` with its weights, eval mode) with a one-line
    UserInputError when the file does not fit: for a file made for another model configuration it names the
    keys that differ and the run's own config.yaml. Returns (model, load report)."""
    from pop3d.config import config_to_dict
    from pop3d.factory import load_student as factory_load_student
    from teacher.weights_io import CheckpointError

    w = require_student_weights(weights)
    try:
        return factory_load_student(cfg, w)
    except CheckpointError as exc:
        msg = str(exc)
        if "does not fit" not in msg:
            raise UserInputError(msg) from exc
        own = w.parent / "config.yaml"
        hint = f"--config {own}" if own.is_file() else "the config.yaml it was trained with"
        what = _config_diff(w, config_to_dict(cfg.model)) or msg.split("; ", 1)[-1][:200]
        raise UserInputError(f"{w} (--weights): made for another model configuration than {config} ({what}); "
                             f"use the run's own config.yaml: {hint}") from exc


TEXT_EMBEDDINGS_TODO = ("make one with scripts/text_embeddings.py --out FILE (--clip-weights CLIP.safetensors; "
                        "--random --small-random-model for a pipeline test), or pass --random-text-embeddings")


def require_text_embeddings(path: str | os.PathLike, key: str) -> Path:
    """A text-embedding file named by ``key`` (--text-embeddings or eval.text_embeddings) must exist."""
    return require_file(path, key, TEXT_EMBEDDINGS_TODO)


def require_student_inputs(args, cfg, split: str, need_lidarseg: bool = False) -> str | None:
    """The checks of every command that runs the student on a split: ``--weights``, the text embeddings
    (``--text-embeddings`` or ``eval.text_embeddings``, unless ``--random-text-embeddings``) and the split's
    shards. Returns the text-embedding path (None: random or none given)."""
    text_path = args.text_embeddings or cfg.eval.text_embeddings
    require_student_weights(args.weights)
    if text_path and not args.random_text_embeddings:
        require_text_embeddings(text_path, "--text-embeddings" if args.text_embeddings else "eval.text_embeddings")
    require_split(cfg.data.shards, split, need_lidarseg=need_lidarseg)
    return text_path


def require_clip_weights(path: str | os.PathLike, key: str = "--clip-weights") -> Path:
    """A LOCAL open_clip ViT-B-16 weight file (nothing is downloaded)."""
    return require_file(path, key, "give a local open_clip ViT-B-16 file (README 'Weights': convert OpenAI's "
                                   "ViT-B-16.pt with scripts/convert_weights.py clip ...); nothing is downloaded")
