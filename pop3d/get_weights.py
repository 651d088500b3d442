"""The released weight files, and getting them into ``ckpts/`` as checked safetensors in one command.

``scripts/get_weights.py`` is the command line. For each file: find it locally (``--from FILE``, ``<out>/<file>``
or ``<out>/downloads/<file>``) or download it to ``<out>/downloads/`` (:mod:`pop3d.downloads`: progress bar,
resume, size/sha256 where known), then convert it with the project's strict converter (the key layout is
always checked; a file that does not fit is refused), which writes ``<out>/<dst>`` atomically. A converted
file already there is skipped. ``<out>/get_weights.json`` records where each file came from and its sha256.

Where a file comes from (checked against the READMEs that publish them):

- ``pop3d``, ``zeroshot``: the POP-3D README ("Pre-trained weights"), data.ciirc.cvut.cz.
- ``fcos3d``: the FCOS3D R101-DCN init linked from the POP-3D README, from the BEVFormer author's release
  (the same file TPVFormer calls ``ckpts/r101_dcn_fcos3d_pretrain.pth``).
- ``clip``: open_clip's own pretrained config for ``('ViT-B-16', 'openai')``: its Hugging Face hub entry
  (``open_clip_model.safetensors``, else ``open_clip_pytorch_model.bin``, the order open_clip itself tries;
  ``HF_ENDPOINT`` is honoured), else its direct URL (OpenAI's TorchScript file, whose sha256 is in its URL).
- ``maskclip_plus``: only behind a SharePoint page (from the POP-3D README; reported dead in
  vobecant/POP3D#2): printed, never downloaded unless a mirror is given.

No sizes or sha256 sums are published for these files; only the OpenAI CLIP file's sha256 is known. The
others are checked against the size the server announces and by the strict conversion, and their sha256
is printed and recorded so that two downloads can be compared.

Nothing here runs inside training or evaluation.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pop3d.downloads import DownloadError, NotFound, check_file, download
from teacher.weights_io import CheckpointError, atomic_path

POP3D_PAGE = "https://github.com/vobecant/POP3D#pre-trained-weights"
MASKCLIP_PLUS_PAGE = ("https://entuedu-my.sharepoint.com/:u:/g/personal/chong033_e_ntu_edu_sg/"
                      "EZSrnPaNFwNNqpECYCkgpg4BEjN782MUD7ZUEPXFWSTEXA?e=mOaseS")
CLIP_MODEL = ("ViT-B-16", "openai")
RECORD = "get_weights.json"


@dataclass(frozen=True)
class Source:
    """One place a file can be downloaded from."""

    url: str
    filename: str  # the name it is stored under in <out>/downloads/
    size: int | None = None  # bytes, where published
    sha256: str | None = None  # where published


@dataclass(frozen=True)
class Released:
    """A released file: where it comes from, how it is converted, what it becomes."""

    name: str  # command-line name
    filename: str  # the published file name
    kind: str  # converter: pop3d | fcos3d | clip | maskclip_plus | zeroshot
    dst: str  # converted file name in <out>
    what: str
    page: str  # where it is documented / to be fetched by hand
    fixed_sources: tuple[Source, ...] = ()  # empty (and no resolver): manual download only
    local_names: tuple[str, ...] = field(default=())  # further names accepted in <out>
    resolver: Callable[[], tuple[Source, ...]] | None = None  # sources found at use (open_clip's config)

    @property
    def sources(self) -> tuple[Source, ...]:
        return self.resolver() if self.resolver is not None else self.fixed_sources

    @property
    def manual(self) -> bool:
        return self.resolver is None and not self.fixed_sources


def clip_sources(model: tuple[str, str] = CLIP_MODEL) -> tuple[Source, ...]:
    """Download sources of a CLIP model from open_clip's pretrained config, in the order open_clip tries them.

    The Hugging Face entry gives ``<HF_ENDPOINT>/<repo>/resolve/main/<file>`` for the safetensors file and then
    the pickled state dict; a direct URL comes last (for OpenAI's files open_clip takes the sha256 from the
    URL's second-to-last part, and so do we).
    """
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
    from open_clip.pretrained import get_pretrained_cfg

    cfg = get_pretrained_cfg(*model)
    if not cfg:
        raise DownloadError(f"open_clip has no pretrained config for {model}; upgrade open_clip_torch")
    out: list[Source] = []
    if cfg.get("hf_hub"):
        repo, filename = cfg["hf_hub"].rstrip("/"), None
        if not cfg["hf_hub"].endswith("/"):
            repo, filename = os.path.split(cfg["hf_hub"])
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        names = [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
        out += [Source(f"{endpoint}/{repo}/resolve/main/{n}", n) for n in names]
    if cfg.get("url"):
        url = cfg["url"]
        sha = url.split("/")[-2] if "openaipublic" in url else None
        out.append(Source(url, os.path.basename(url), sha256=sha if sha and len(sha) == 64 else None))
    return tuple(out)


def catalogue() -> dict[str, Released]:
    """Every released file, by command-line name (CLIP's sources are looked up in open_clip when used)."""
    ciirc = "https://data.ciirc.cvut.cz/public/projects/2023POP3D"
    fcos3d_url = "https://github.com/zhiqi-li/storage/releases/download/v1.0/r101_dcn_fcos3d_pretrain.pth"
    entries = [
        Released("pop3d", "pop3d_weights.pth", "pop3d", "pop3d.safetensors",
                 "POP-3D student weights of the paper", POP3D_PAGE,
                 (Source(f"{ciirc}/pop3d_weights.pth", "pop3d_weights.pth"),)),
        Released("zeroshot", "zeroshot_weights.pth", "zeroshot", "zeroshot_text.safetensors",
                 "POP-3D zero-shot text embeddings (nuScenes classes)", POP3D_PAGE,
                 (Source(f"{ciirc}/zeroshot_weights.pth", "zeroshot_weights.pth"),)),
        Released("fcos3d", "r101_dcn_fcos3d_pretrain.pth", "fcos3d", "fcos3d.safetensors",
                 "FCOS3D ResNet-101-DCN + FPN, the training initialisation",
                 "https://github.com/vobecant/POP3D#pop-3d", (Source(fcos3d_url, "r101_dcn_fcos3d_pretrain.pth"),)),
        Released("clip", "open_clip_model.safetensors", "clip", "clip_vit_b16.safetensors",
                 "CLIP ViT-B/16 (OpenAI), through open_clip: text tower + MaskCLIP ViT teacher",
                 "https://github.com/mlfoundations/open_clip",
                 local_names=("open_clip_pytorch_model.bin", "ViT-B-16.pt"), resolver=clip_sources),
        Released("maskclip_plus", "maskclip_plus_vit16_deeplabv2_r101-d8_512x512_8k_coco-stuff164k.pth",
                 "maskclip_plus", "maskclip_plus.safetensors", "MaskCLIP+ DeepLabv2-R101 teacher (COCO-Stuff)",
                 MASKCLIP_PLUS_PAGE),
    ]
    return {e.name: e for e in entries}


# ----------------------------------------------------------------------------------------------------
# converted files already there
# ----------------------------------------------------------------------------------------------------

def _expected_meta(entry: Released, model_cfg) -> dict[str, str]:
    from teacher.checkpoint import CLIP_FORMAT, MASKCLIP_PLUS_FORMAT, TEXT_FORMAT

    if entry.kind in ("pop3d", "fcos3d"):
        return {"kind": entry.kind, "config": json.dumps(model_cfg.to_dict())}
    return {"format": {"clip": CLIP_FORMAT, "maskclip_plus": MASKCLIP_PLUS_FORMAT,
                       "zeroshot": TEXT_FORMAT}[entry.kind]}


def already_converted(entry: Released, dst: Path, model_cfg) -> bool:
    """True when ``dst`` is this entry's converted file (for this model config); False when absent.

    Raises :class:`CheckpointError` when ``dst`` exists but is something else (it is never overwritten
    without ``--force``).
    """
    if not dst.exists():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(dst), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
    except Exception as exc:
        raise CheckpointError(f"{dst}: exists but is not a safetensors file ({type(exc).__name__}); move it away "
                              f"or pass --force to replace it") from exc
    for key, want in _expected_meta(entry, model_cfg).items():
        if meta.get(key) != want:
            what = "another model config" if key == "config" else f"{key}={meta.get(key)!r}, not {want!r}"
            raise CheckpointError(f"{dst}: exists but was not converted from {entry.filename} for this run "
                                  f"({what}); pass --force to convert again, or move it away")
    return True


# ----------------------------------------------------------------------------------------------------
# one file
# ----------------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    """What happened to one entry."""

    name: str
    status: str  # converted | skipped | manual
    dst: Path
    raw: Path | None = None
    origin: str = ""  # URL or 'local file'
    sha256: str | None = None
    size: int | None = None
    sha256_checked: bool = False

    def line(self) -> str:
        if self.status == "skipped":
            return f"{self.name}: {self.dst} already converted, skipped (pass --force to redo)"
        if self.status == "manual":
            return f"{self.name}: NOT fetched: {self.origin}"
        check = "sha256 checked" if self.sha256_checked else "sha256 not published, not checked"
        return (f"{self.name}: {self.raw} ({self.size:,} bytes, sha256 {self.sha256}; {check}) -> {self.dst} "
                f"(key layout checked)")


class ManualDownload(DownloadError):
    """The file sits behind a page that needs a person; the message says where and what to do."""


def manual_message(entry: Released, out: Path) -> str:
    return (f"{entry.filename} needs a manual download from {entry.page} (if that link is dead, ask the "
            f"MaskCLIP authors, https://github.com/chongzhou96/MaskCLIP); put it in {out}/ or pass "
            f"--from FILE, then run this command again")


def sources_for(entry: Released, base_url: str | None, url: str | None) -> tuple[Source, ...]:
    """The entry's sources, or ``url`` (one file), or each published file name under a mirror ``base_url``."""
    if url:
        return (Source(url, os.path.basename(url.split("?")[0]) or entry.filename),)
    if base_url:
        base = base_url.rstrip("/")
        names = list(entry.sources) or [Source("", entry.filename)]
        return tuple(Source(f"{base}/{s.filename}", s.filename, s.size, s.sha256) for s in names)
    return entry.sources


def _local_file(entry: Released, out: Path, given: Path | None) -> Path | None:
    if given is not None:
        if not given.is_file():
            raise DownloadError(f"{given}: no such file (--from)")
        return given
    names = (entry.filename, *entry.local_names, *(s.filename for s in entry.sources))
    for folder in (out, out / "downloads"):
        for n in dict.fromkeys(names):
            if (folder / n).is_file():
                return folder / n
    return None


def _known_check(entry: Released, raw: Path) -> tuple[str, bool]:
    """sha256 of a local file, checked against a source of the same file name where one is published."""
    same = [s for s in entry.sources if s.filename == raw.name]
    size, sha = (same[0].size, same[0].sha256) if same else (None, None)
    digest = check_file(raw, size, sha, "it is not the released file: get it again")
    return digest, bool(sha)


def _fetch(entry: Released, out: Path, sources: tuple[Source, ...], retries: int, timeout: float,
           progress: bool) -> tuple[Path, str, str, bool]:
    """Download from the first source that has the file (a 404 moves on to the next)."""
    errors = []
    for src in sources:
        print(f"{entry.name}: downloading {src.url}", flush=True)
        try:
            got = download(src.url, out / "downloads" / src.filename, expected_size=src.size,
                           expected_sha256=src.sha256, retries=retries, timeout=timeout, progress=progress)
        except NotFound as exc:
            if src is sources[-1]:
                raise NotFound("; ".join([*errors, str(exc)])) from exc
            errors.append(str(exc))
            continue
        if got.resumed_from:
            print(f"{entry.name}: resumed at byte {got.resumed_from:,}")
        return got.path, src.url, got.sha256, bool(src.sha256)
    raise DownloadError(f"{entry.name}: no source to download from")


def convert(entry: Released, raw: Path, dst: Path, model_cfg, allow_unsafe_pickle: bool) -> None:
    """Run the project's strict converter for ``entry.kind`` (raises :class:`CheckpointError`)."""
    if entry.kind in ("pop3d", "fcos3d"):
        from pop3d.checkpoint import convert_fcos3d_checkpoint, convert_pop3d_checkpoint

        fn = convert_pop3d_checkpoint if entry.kind == "pop3d" else convert_fcos3d_checkpoint
        fn(raw, dst, model_cfg, allow_unsafe_pickle=allow_unsafe_pickle, verbose=False)
        return
    from teacher.checkpoint import convert_clip_weights, convert_maskclip_plus, convert_zeroshot_weights

    fn = {"clip": convert_clip_weights, "maskclip_plus": convert_maskclip_plus,
          "zeroshot": convert_zeroshot_weights}[entry.kind]
    fn(raw, dst, allow_unsafe_pickle=allow_unsafe_pickle, quiet=True)


def get_one(entry: Released, out: Path, model_cfg, *, source_file: Path | None = None,
            base_url: str | None = None, url: str | None = None, force: bool = False,
            allow_unsafe_pickle: bool = False, retries: int = 3, timeout: float = 60.0,
            progress: bool = True) -> Outcome:
    """Get one released file into ``out / entry.dst`` (see the module docstring). Raises
    :class:`DownloadError` (incl. :class:`ManualDownload`) or :class:`CheckpointError`."""
    dst = out / entry.dst
    if not force and already_converted(entry, dst, model_cfg):
        return Outcome(entry.name, "skipped", dst)
    raw = _local_file(entry, out, source_file)
    if raw is not None:
        origin = "local file"
        digest, checked = _known_check(entry, raw)
    else:
        sources = sources_for(entry, base_url, url)
        if not sources:
            raise ManualDownload(f"{entry.name}: " + manual_message(entry, out))
        try:
            raw, origin, digest, checked = _fetch(entry, out, sources, retries, timeout, progress)
        except NotFound as exc:
            if not entry.manual:
                raise
            raise ManualDownload(f"{entry.name}: not on the mirror ({exc}); " + manual_message(entry, out)) from exc
    try:
        convert(entry, raw, dst, model_cfg, allow_unsafe_pickle)
    except CheckpointError as exc:
        hint = "" if origin == "local file" else f" (downloaded from {origin}; delete it to download again)"
        raise CheckpointError(f"{exc}{hint}") from exc
    return Outcome(entry.name, "converted", dst, raw, origin, digest, raw.stat().st_size, checked)


def record(out: Path, outcome: Outcome) -> None:
    """Add a converted file's provenance to ``<out>/get_weights.json`` (atomic rewrite)."""
    path = out / RECORD
    try:
        data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        data = {}
    data[outcome.name] = {"file": outcome.dst.name, "source": outcome.origin, "raw_file": str(outcome.raw),
                          "bytes": outcome.size, "sha256": outcome.sha256,
                          "sha256_published": outcome.sha256_checked,
                          "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
