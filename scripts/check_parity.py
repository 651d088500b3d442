#!/usr/bin/env python
"""Check that our model reproduces the official code's outputs stored in a fixture directory.

    python scripts/check_parity.py --fixture tests/fixtures/student_tiny
    python scripts/check_parity.py --fixture tests/fixtures/teacher_tiny

The fixture's ``config.json`` says its ``kind`` (``student`` or ``teacher``). The model is built from that
config, the official ``state_dict.pth`` goes through our converter (pickle read with weights_only=True), the
model runs on ``inputs.pt`` and every output is compared with ``outputs.pt``. Prints each output's max
absolute error; exits 1 when one exceeds the tolerance (1e-4), 2 when the fixture itself is unusable.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TOLERANCE = 1e-4


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixture", required=True, type=Path, help="directory with config.json, state_dict.pth, "
                        "inputs.pt, outputs.pt")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE)
    parser.add_argument("--backend", default="pytorch", help="student deformable-attention backend "
                        "(pytorch | mmcv)")
    args = parser.parse_args(argv)

    cfg_path = args.fixture / "config.json"
    missing = [n for n in ("config.json", "state_dict.pth", "inputs.pt", "outputs.pt")
               if not (args.fixture / n).is_file()]
    if missing:
        print(f"error: {args.fixture}: missing {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        kind = json.loads(cfg_path.read_text()).get("kind")
    except json.JSONDecodeError as exc:
        print(f"error: {cfg_path}: not valid JSON ({exc})", file=sys.stderr)
        return 2
    if kind == "student":
        from pop3d.parity import check_student_fixture

        rows = check_student_fixture(args.fixture, backend=args.backend)
        checked = {name: err for name, err in (rows.items() if isinstance(rows, dict) else rows)}
        informative: dict[str, float] = {}
    elif kind == "teacher":
        from teacher.parity import check_teacher_fixture

        result = check_teacher_fixture(args.fixture)
        checked = {"point_features (from resized_bgr)": result["from_resized"]["max_abs"]}
        informative = {
            "point_features (from image_bgr, our resize)": result["from_raw"]["max_abs"],
            "point_features (image_bgr, float resize)": result["from_raw_float_resize"]["max_abs"],
            "point_features (grid_sample fast path)": result["grid_sample_from_resized"]["max_abs"],
        }
        if result["min_feature"] < 0:
            print(f"FAIL: the teacher produced a negative feature ({result['min_feature']:.3g}); "
                  "MaskCLIP+ features end in ReLU")
            return 1
    else:
        print(f"error: {cfg_path}: 'kind' must be 'student' or 'teacher', got {kind!r}", file=sys.stderr)
        return 2

    print(f"fixture {args.fixture} ({kind}), tolerance {args.tolerance:g}")
    print(f"{'output':<46}{'max abs error':>16}  status")
    failed = False
    for name, err in checked.items():
        ok = err <= args.tolerance
        failed |= not ok
        print(f"{name:<46}{err:>16.3e}  {'ok' if ok else 'FAIL'}")
    for name, err in informative.items():
        print(f"{name:<46}{err:>16.3e}  (stated, not checked)")
    print("PARITY FAILED" if failed else "parity ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
