#!/usr/bin/env python
"""Download the released weight files and convert them to checked safetensors, in one command.

    python scripts/get_weights.py --all --out ckpts/            # everything that can be downloaded
    python scripts/get_weights.py pop3d zeroshot --out ckpts/   # some of them
    python scripts/get_weights.py maskclip_plus --from ~/Downloads/maskclip_plus_vit16_...pth --out ckpts/
    python scripts/get_weights.py --list                        # what each name is and where it comes from

Each file is downloaded to <out>/downloads/ with a progress bar (a broken download resumes where it stopped:
run the same command again), checked (size and sha256 where published; always the key layout, by the strict
converter of scripts/convert_weights.py) and written as <out>/<name>.safetensors. Files already converted are
skipped. The MaskCLIP+ checkpoint is only behind a manual download page: the command prints where, and
converts the file once it is in <out>/ or given with --from. --base-url points every download at a mirror
holding the files under their published names; --url NAME=URL replaces one file's URL.

Exit status: 0 done, 2 an error (one line naming the file or URL and what to do).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pop3d.downloads import DownloadError
from pop3d.get_weights import ManualDownload, catalogue, get_one, manual_message, record
from teacher.weights_io import UNSAFE_FLAG, CheckpointError


def parse_args(argv: list[str] | None, names: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", metavar="NAME", help=f"files to get: {', '.join(names)}")
    p.add_argument("--all", action="store_true", help="every file (the manual one only if it is already here)")
    p.add_argument("--list", action="store_true", help="print what each file is and where it comes from")
    p.add_argument("--out", type=Path, default=Path("ckpts"), help="output folder (default: ckpts)")
    p.add_argument("--from", dest="source", type=Path, help="use this local file instead of downloading "
                   "(exactly one NAME)")
    p.add_argument("--base-url", help="a mirror: every file is fetched as <base-url>/<published file name>")
    p.add_argument("--url", action="append", default=[], metavar="NAME=URL", help="download NAME from URL")
    p.add_argument("--config", type=Path, help="run config whose `model` section the student weights must fit "
                   "(pop3d, fcos3d; default: the paper configuration)")
    p.add_argument("--force", action="store_true", help="convert again even if the output exists")
    p.add_argument("--retries", type=int, default=3, help="attempts after a broken transfer (default 3)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds without data before a retry")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(UNSAFE_FLAG, dest="unsafe", action="store_true",
                   help="allow full unpickling (e.g. OpenAI's TorchScript CLIP file; only for trusted files)")
    return p.parse_args(argv)


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _model_config(path: Path | None):
    """The `model` section of a run config (only that section is read: the teacher's weights need not exist)."""
    from pop3d.model.config import StudentConfig

    if path is None:
        return StudentConfig()
    import yaml

    if not path.is_file():
        raise ValueError(f"{path}: no such config file (--config)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        return StudentConfig.from_dict((raw.get("model") if isinstance(raw, dict) else None) or {})
    except (yaml.YAMLError, ValueError, TypeError) as exc:
        raise ValueError(f"{path}: its `model` section is not a valid student config ({exc})") from exc


def _print_list(entries) -> None:
    for e in entries.values():
        src = "; ".join(s.url for s in e.sources) if e.sources else f"MANUAL download: {e.page}"
        sha = ", ".join(f"{s.filename} sha256 {s.sha256}" for s in e.sources if s.sha256) or "sha256 unknown"
        print(f"{e.name:14s} {e.filename} -> {e.dst}\n{'':14s} {e.what}\n{'':14s} {src}\n{'':14s} {sha}")


def main(argv: list[str] | None = None) -> int:
    entries = catalogue()
    args = parse_args(argv, list(entries))
    if args.list:
        _print_list(entries)
        return 0
    unknown = [n for n in args.names if n not in entries]
    if unknown:
        return _fail(f"unknown name(s) {unknown}; choose from {list(entries)} or --all")
    if args.all == bool(args.names):
        return _fail("give one or more NAMEs or --all (see --list)")
    names = list(entries) if args.all else list(dict.fromkeys(args.names))
    if args.source is not None and len(names) != 1:
        return _fail("--from FILE goes with exactly one NAME")
    urls = {}
    for item in args.url:
        name, sep, url = item.partition("=")
        if not sep or name not in entries or not url:
            return _fail(f"--url {item!r}: expected NAME=URL with NAME one of {list(entries)}")
        urls[name] = url
    if args.retries < 0 or args.timeout <= 0:
        return _fail("--retries must be >= 0 and --timeout > 0")
    try:
        model_cfg = _model_config(args.config) if {"pop3d", "fcos3d"} & set(names) else None
    except ValueError as exc:
        return _fail(str(exc))
    pending = []
    for name in names:
        try:
            outcome = get_one(entries[name], args.out, model_cfg, source_file=args.source, base_url=args.base_url,
                              url=urls.get(name), force=args.force, allow_unsafe_pickle=args.unsafe,
                              retries=args.retries, timeout=args.timeout, progress=not args.no_progress)
        except ManualDownload as exc:
            if not args.all:
                return _fail(str(exc))
            print(f"note: {name}: NOT fetched: {manual_message(entries[name], args.out)}")
            pending.append(name)
            continue
        except (DownloadError, CheckpointError) as exc:
            return _fail(str(exc))
        except OSError as exc:
            return _fail(f"{exc.filename or args.out}: {exc.strerror or exc}; check the folder and free space")
        except KeyboardInterrupt:
            print(f"\ninterrupted: {name} not finished; run the same command again to resume", file=sys.stderr)
            return 130
        print(outcome.line(), flush=True)
        if outcome.status == "converted":
            record(args.out, outcome)
    done = len(names) - len(pending)
    print(f"{done} of {len(names)} file(s) ready in {args.out}/" + (f"; waiting for a manual download: "
                                                                   f"{', '.join(pending)}" if pending else ""))
    if "clip" in names and "clip" not in pending:
        print(f"next: python scripts/text_embeddings.py --clip-weights {args.out}/clip_vit_b16.safetensors "
              f"--out {args.out}/nuscenes_text.safetensors   (or use the released {args.out}/zeroshot_text."
              f"safetensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
