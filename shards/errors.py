"""Errors of the shard reading side, and the one-line form a command line prints.

Every error raised while reading a shard set starts with the shard (path or URL) and, where a sample is
concerned, names its key and member: ``<shard>: sample <key>: member <field>: <problem>``.
"""

from __future__ import annotations

import re


class ShardReadError(RuntimeError):
    """A shard set, a shard or a sample cannot be read or fails verification (message names shard + key)."""


class SampleDecodeError(ShardReadError):
    """A member of a sample cannot be decoded; the message names the shard, the sample key and the member."""


class MissingSplitError(ShardReadError, ValueError):
    """The shard set has no shards of the requested split (also a ``ValueError``, as before)."""


#: Exceptions the command lines turn into ``error: <one line>`` and exit status 2.
DATA_ERRORS: tuple[type[BaseException], ...] = (ShardReadError,)

_WRAPPED = re.compile(r"^(?:[\w.]+\.)?(?:ShardReadError|SampleDecodeError|DataError): (?P<msg>.*)$")


def one_line(exc: BaseException) -> str:
    """The original message of a shard error, also when a DataLoader worker re-raised it.

    torch re-raises a worker's exception as ``Type("Caught Type in DataLoader worker ...\\nOriginal
    Traceback ...\\n<module>.Type: <message>")``; the last such line is the message the worker raised.
    """
    text = str(exc)
    if "Original Traceback" not in text:
        return " ".join(text.split("\n"))
    for line in reversed(text.strip().splitlines()):
        m = _WRAPPED.match(line.strip())
        if m:
            return m.group("msg")
    return text.strip().splitlines()[-1]
