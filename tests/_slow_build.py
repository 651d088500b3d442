"""``python tests/_slow_build.py SECONDS <build_shards.py arguments>``: the shard build, slowed down.

Sleeps SECONDS after reading each sample (``shards.writer.load_sample`` wrapped here, in the test tree), so a
test can SIGKILL the build mid-shard. Only for ``--workers 1`` (the wrap lives in this process).
"""
from __future__ import annotations

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from shards import writer


def main() -> int:
    delay = float(sys.argv[1])
    load = writer.load_sample

    def slow_load(*args, **kwargs):
        out = load(*args, **kwargs)
        time.sleep(delay)
        return out

    writer.load_sample = slow_load
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import build_shards

    return build_shards.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
