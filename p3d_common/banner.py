"""One loud banner for outputs that mean nothing (random weights, random text or query embeddings)."""
from __future__ import annotations

import logging

BAR = "!" * 100


def banner_text(message: str) -> str:
    """The three-line banner: a bar of '!', ``'!! ' + message``, a bar."""
    return f"{BAR}\n!! {message}\n{BAR}"


def warn_meaningless(message: str, log: logging.Logger | None = None) -> None:
    """Show the banner: on stdout, or as three warnings of ``log`` when one is given."""
    if log is None:
        print(banner_text(message))
        return
    log.warning(BAR)
    log.warning("%s", message)
    log.warning(BAR)
