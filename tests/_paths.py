"""Where the tests' reference files live: ``tests/fixtures/``, part of the repository.

``tests/fixtures/student_tiny`` and ``teacher_tiny`` are outputs of the official code (see their READMEs);
``tests/fixtures/student_state_dict_keys.tsv`` lists the official checkpoint's keys and shapes.
"""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
STATE_DICT_KEYS_TSV = FIXTURES / "student_state_dict_keys.tsv"
