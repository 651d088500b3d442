"""Small helpers shared by ``shards/``, ``teacher/`` and ``pop3d/``: the label taxonomy, atomic file writing,
safetensors I/O and the loud banner for meaningless (random) inputs.

A leaf package: it imports nothing of ours, and nothing here imports torch at module import time, so the
data side (``shards/``) can use it without pulling in the network code.
"""
