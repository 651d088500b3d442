"""Resumable HTTP(S) downloads for the released weight files (``scripts/get_weights.py``; never training/eval).

:func:`download` streams a URL into ``<dest>.part`` with a tqdm bar. A broken transfer keeps the ``.part``;
the next attempt (a retry in the same run, or the next run) asks the server for the rest with an HTTP
``Range`` request (``If-Range`` with the validator the server gave, so a file that changed meanwhile is
fetched whole again). When complete, the size is checked against what the server announced and against the
expected size where one is known, the sha256 against the expected one where known; then the ``.part`` is
fsynced and renamed onto ``dest``. Failures raise :class:`DownloadError` with a one-line message naming the
URL or file and what to do.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1 << 20
USER_AGENT = "pop3d-get-weights/1"
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class DownloadError(RuntimeError):
    """A download that failed; the message is one line naming the URL or file and what to do."""


class NotFound(DownloadError):
    """The server has no such file (HTTP 404 / 410)."""


class _Retryable(Exception):
    """A transfer that broke (connection reset, timeout, short body, HTTP 5xx): worth another attempt."""


@dataclass
class Downloaded:
    """What :func:`download` produced."""

    path: Path
    size: int
    sha256: str
    resumed_from: int  # bytes already on disk when the last (successful) attempt started; 0 = from scratch
    attempts: int


def _urlopen(req: urllib.request.Request, timeout: float):
    """The one place that opens a connection (tests wrap it to allow only loopback)."""
    return urllib.request.urlopen(req, timeout=timeout)


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def check_file(path: Path, expected_size: int | None, expected_sha256: str | None,
               remedy: str = "delete it and re-run to download it again") -> str:
    """Check a complete file's size and sha256 where known; returns its sha256. ``remedy`` ends the error."""
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        raise DownloadError(f"{path}: {size} bytes, but the released file has {expected_size}; {remedy}")
    digest = sha256_of(path)
    if expected_sha256 and digest != expected_sha256.lower():
        raise DownloadError(f"{path}: sha256 {digest} differs from the released file's {expected_sha256}; "
                            f"{remedy}")
    return digest


def _sidecar(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _read_state(part: Path, url: str) -> dict:
    """The saved validator/total of a ``.part`` of this URL; a ``.part`` of another URL is discarded."""
    side = _sidecar(part)
    try:
        state = json.loads(side.read_text()) if side.is_file() else {}
    except (OSError, ValueError):
        state = {}
    if part.exists() and state.get("url") != url:
        part.unlink()
        state = {}
    return state


def _write_state(part: Path, state: dict) -> None:
    side = _sidecar(part)
    tmp = side.with_name(side.name + ".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, side)


def _request(url: str, offset: int, validator: str | None) -> urllib.request.Request:
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if validator:
            headers["If-Range"] = validator
    return urllib.request.Request(url, headers=headers)


def _open_at(url: str, part: Path, state: dict, timeout: float):
    """Open ``url`` to continue ``part``: (response, offset the body starts at, total size or None).

    A 206 continues the ``.part``; a 200 (server without Range support, or the file changed) restarts it;
    a 416 means the ``.part`` is already whole (when its size is the saved total) or unusable (restart).
    """
    offset = part.stat().st_size if part.exists() else 0
    try:
        resp = _urlopen(_request(url, offset, state.get("validator")), timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            m = re.fullmatch(r"bytes \*/(\d+)", (exc.headers.get("Content-Range") or "").strip())
            server_total = int(m.group(1)) if m else state.get("total")
            if server_total == offset:  # the .part is already the whole file
                return None, offset, offset
        if exc.code == 416:  # the .part does not fit the file on the server: start again at once
            part.unlink(missing_ok=True)
            return _open_at(url, part, {}, timeout)
        if exc.code >= 500 or exc.code == 429:
            raise _Retryable(f"HTTP {exc.code} {exc.reason}") from exc
        cls = NotFound if exc.code in (404, 410) else DownloadError
        raise cls(f"{url}: HTTP {exc.code} {exc.reason}; check the URL (--base-url / --url) or get "
                  f"the file by hand and pass it with --from") from exc
    except urllib.error.URLError as exc:
        raise _Retryable(f"cannot reach the server ({exc.reason})") from exc
    except (OSError, http.client.HTTPException) as exc:  # reset, timeout, bad status line
        raise _Retryable(f"cannot reach the server ({type(exc).__name__}: {exc})") from exc
    if resp.status == 206:
        m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
        if not m or int(m.group(1)) != offset:
            resp.close()
            if not offset:
                raise _Retryable("the server answered a byte range that was not asked for")
            part.unlink(missing_ok=True)  # another range than asked: start again at once
            return _open_at(url, part, {}, timeout)
        total = None if m.group(3) == "*" else int(m.group(3))
    else:
        offset = 0
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
    state.update(url=url, total=total,
                 validator=resp.headers.get("ETag") or resp.headers.get("Last-Modified") or state.get("validator"))
    _write_state(part, state)
    return resp, offset, total


def _stream(resp, part: Path, offset: int, total: int | None, desc: str, progress: bool) -> None:
    """Append the response body to ``part`` (truncated to ``offset`` first), with a progress bar."""
    from tqdm import tqdm

    mode = "r+b" if offset else "wb"
    with open(part, mode) as f, tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                                      desc=desc, disable=not progress, leave=False) as bar:
        f.seek(offset)
        f.truncate()
        try:
            while True:
                try:
                    block = resp.read(CHUNK)
                except (OSError, http.client.HTTPException) as exc:  # reading broke; a failed write is raised
                    raise _Retryable(f"the connection broke after {f.tell()} bytes ({type(exc).__name__})") \
                        from exc
                if not block:
                    break
                f.write(block)
                bar.update(len(block))
        finally:
            f.flush()
            os.fsync(f.fileno())
            resp.close()
        got = f.tell()
    if total is not None and got != total:
        raise _Retryable(f"the connection ended after {got} of {total} bytes")


def _attempt(url: str, part: Path, desc: str, timeout: float, progress: bool) -> int:
    """One attempt to complete ``part``; returns the offset it resumed from."""
    state = _read_state(part, url)
    resp, offset, total = _open_at(url, part, state, timeout)
    if resp is not None:
        _stream(resp, part, offset, total, desc, progress)
    return offset


def download(url: str, dest: str | os.PathLike, *, expected_size: int | None = None,
             expected_sha256: str | None = None, retries: int = 3, timeout: float = 60.0,
             backoff: float = 2.0, progress: bool = True) -> Downloaded:
    """Download ``url`` to ``dest`` (resuming ``dest.part``), check it, rename it into place.

    ``retries``: further attempts after a broken transfer in this call (each resumes where the last one
    stopped; waits ``backoff * 2**i`` seconds, at most 30). Raises :class:`DownloadError`.
    """
    if not url.startswith(("http://", "https://")):
        raise DownloadError(f"{url}: only http:// and https:// URLs can be downloaded")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(backoff * 2 ** (attempt - 1), 30.0))
        try:
            offset = _attempt(url, part, dest.name, timeout, progress)
            break
        except _Retryable as exc:
            last = str(exc)
    else:
        kept = f"; {part.stat().st_size} bytes kept in {part}" if part.exists() else ""
        raise DownloadError(f"{url}: download failed after {retries + 1} attempt(s): {last}{kept}; check the "
                            f"connection and re-run the same command to resume")
    try:
        digest = check_file(part, expected_size, expected_sha256,
                            f"removed it; re-run to download {url} again (if it fails again, the server does "
                            f"not hold the released file: use another source with --url or --from)")
    except DownloadError:
        part.unlink(missing_ok=True)
        _sidecar(part).unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    _sidecar(part).unlink(missing_ok=True)
    _fsync_dir(dest.parent)
    return Downloaded(dest, dest.stat().st_size, digest, offset, attempt + 1)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
