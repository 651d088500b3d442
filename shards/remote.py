"""Where a shard set lives: a local folder, the URL of one, or a ``pipe:`` command; opening its files as streams.

``data.shards`` (or any ``source`` of :mod:`shards.loader`) may be

- a local folder (or ``file://`` URL) holding ``manifest.json`` and the tars;
- ``http://`` / ``https://`` URL of such a folder (stdlib ``urllib``, streamed, no extra package);
- any other ``scheme://`` URL that `fsspec <https://filesystem-spec.readthedocs.io>`_ opens (``s3://``,
  ``gs://``, ``hf://``, ``memory://`` ...; the scheme's backend package, e.g. ``s3fs``, must be installed);
- ``pipe:<command with {name}>``: a shell command writing the file ``{name}`` to stdout, as WebDataset's
  ``pipe:`` URLs, e.g. ``pipe:aws s3 cp s3://bucket/shards/{name} -``.

A remote source must hold ``manifest.json`` (there is no directory listing). Files are read sequentially,
once, as streams; a tar is checked for its end-of-archive marker after its last member, so a shard cut at a
sample boundary fails as loudly as one cut mid-member. Every failure is a :class:`ShardReadError` whose
message starts with the file's URL.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import IO, Any

from shards.errors import ShardReadError

log = logging.getLogger(__name__)

#: Seconds an http(s) connection may stay silent.
HTTP_TIMEOUT_S = 60.0
#: Waits before the 2nd, 3rd ... attempt to open an http(s) file after a connection error or HTTP 5xx.
HTTP_RETRY_WAITS_S: tuple[float, ...] = (1.0, 4.0, 15.0)
_BLOCK = 512


def is_remote(source: str) -> bool:
    """True for ``pipe:`` commands and ``scheme://`` URLs other than ``file://``."""
    return source.startswith("pipe:") or ("://" in source and not source.startswith("file://"))


def local_path(source: str) -> str:
    """A local source without its ``file://`` prefix."""
    return source.removeprefix("file://")


def join(source: str, name: str) -> str:
    """The URL / path of file ``name`` of the shard set ``source``."""
    if source.startswith("pipe:"):
        if "{name}" not in source:
            raise ShardReadError(f"{source}: a pipe: source must contain {{name}} where the file name goes, "
                                 "e.g. 'pipe:aws s3 cp s3://bucket/shards/{name} -'")
        return source.replace("{name}", name)
    if is_remote(source):
        return source.rstrip("/") + "/" + name
    return os.path.join(local_path(source), name)


class _PipeStream:
    """stdout of a ``pipe:`` command; closing checks its exit status."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)

    def read(self, n: int = -1) -> bytes:
        return self.proc.stdout.read(n)

    def close(self, complete: bool = True) -> None:
        if self.proc.poll() is None and not complete:
            self.proc.kill()
        self.proc.stdout.close()
        err = self.proc.stderr.read().decode(errors="replace").strip()
        self.proc.stderr.close()
        rc = self.proc.wait()
        if complete and rc != 0:
            raise ShardReadError(f"{self.url}: command exited with status {rc}: {err[-300:]}")


@contextlib.contextmanager
def open_stream(url: str) -> Iterator[IO[bytes]]:
    """Open a file of a shard set for sequential binary reading (see the module docstring for URL kinds)."""
    if url.startswith("pipe:"):
        stream = _PipeStream(url)
        complete = False
        try:
            yield stream  # type: ignore[misc]
            complete = True
        finally:
            stream.close(complete)
        return
    try:
        if url.startswith(("http://", "https://")):
            opened: Any = _http_open(url)
        elif is_remote(url):
            opened = _fsspec_open(url)
        else:
            opened = open(local_path(url), "rb", buffering=1 << 20)  # noqa: SIM115 - closed below
    except urllib.error.HTTPError as exn:
        raise ShardReadError(f"{url}: cannot open: HTTP {exn.code} {exn.reason}") from None
    except urllib.error.URLError as exn:
        raise ShardReadError(f"{url}: cannot open: {exn.reason}") from None
    except FileNotFoundError:
        raise ShardReadError(f"{url}: missing (listed in the manifest, not found)") from None
    except OSError as exn:
        raise ShardReadError(f"{url}: cannot open: {exn}") from None
    with opened as f:
        yield f


def _http_open(url: str) -> Any:
    """``urlopen`` with a few retries on connection errors and HTTP 5xx (each retry logged)."""
    for attempt, wait in enumerate((*HTTP_RETRY_WAITS_S, None)):
        try:
            return urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S)
        except urllib.error.HTTPError as exn:
            if exn.code < 500 or wait is None:
                raise
            problem = f"HTTP {exn.code}"
        except (urllib.error.URLError, OSError) as exn:
            if wait is None:
                raise
            problem = str(getattr(exn, "reason", exn))
        log.warning("%s: %s; retry %d of %d in %.0f s", url, problem, attempt + 1, len(HTTP_RETRY_WAITS_S), wait)
        time.sleep(wait)
    raise AssertionError("unreachable")


def _fsspec_open(url: str) -> Any:
    try:
        import fsspec

        return fsspec.open(url, "rb").open()
    except (ImportError, ValueError) as exn:
        raise ShardReadError(f"{url}: fsspec cannot open this URL ({exn}); install the fsspec backend of "
                             "its scheme (e.g. s3fs, gcsfs)") from None


def read_bytes(url: str) -> bytes:
    """The whole file (manifests)."""
    with open_stream(url) as f:
        try:
            return f.read()
        except OSError as exn:
            raise ShardReadError(f"{url}: read failed: {exn}") from None


class _TrackedStream:
    """Read-through wrapper: counts bytes, keeps the last 1024, feeds an optional callback (hashing)."""

    def __init__(self, url: str, f: IO[bytes], prefix: bytes, on_bytes: Callable[[bytes], None] | None) -> None:
        self.url, self.f, self.prefix, self.on_bytes = url, f, prefix, on_bytes
        self.size, self.tail = 0, b""

    def _account(self, b: bytes) -> None:
        self.size += len(b)
        self.tail = (self.tail + b)[-2 * _BLOCK:]
        if self.on_bytes is not None and b:
            self.on_bytes(b)

    def read(self, n: int = -1) -> bytes:
        if self.prefix:
            b, self.prefix = (self.prefix, b"") if n < 0 or n >= len(self.prefix) else \
                (self.prefix[:n], self.prefix[n:])
            return b
        try:
            b = self.f.read(n)
        except (OSError, http.client.HTTPException) as exn:
            raise ShardReadError(f"{self.url}: read failed after {self.size} bytes: {exn!r}") from None
        self._account(b)
        return b

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def iter_tar_members(url: str, on_bytes: Callable[[bytes], None] | None = None) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular members of a tar read as one stream, then an end-of-archive check.

    An archive of only zero blocks (an empty shard) yields nothing. ``on_bytes`` sees every byte of the
    file in order (e.g. ``hashlib.sha256().update``). Raises :class:`ShardReadError` naming ``url`` when the
    file cannot be opened, or is not a multiple of 512 bytes ending with two zero blocks (after the last
    member was yielded); ``tarfile.ReadError`` on a damaged member (the caller names the sample).
    """
    with open_stream(url) as f:
        stream = _TrackedStream(url, f, b"", on_bytes)
        first = stream.read(_BLOCK)
        stream.prefix = first
        if first.strip(b"\0"):
            with tarfile.open(fileobj=stream, mode="r|") as tf:  # type: ignore[call-overload]
                for ti in tf:
                    if ti.isreg():
                        fobj = tf.extractfile(ti)
                        yield ti.name, fobj.read() if fobj is not None else b""
        stream.drain()
    if stream.size == 0 or stream.size % _BLOCK or len(stream.tail) < 2 * _BLOCK or stream.tail.strip(b"\0"):
        raise ShardReadError(f"{url}: truncated or corrupt tar shard ({stream.size} bytes; no end-of-archive "
                             "marker)")
