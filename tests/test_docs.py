"""Every citation of the facts documents (``pipeline.md §1.8-3``, ``teacher.md §3.2, §6`` ...) resolves to a
section (and, for ``§A-k`` with a one-level k, a numbered item or a section) of docs/ in this repository.

Run as a script to list the citations: ``python tests/test_docs.py``.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("pipeline", "student", "teacher")
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".toml"}
_NUM = r"\d+(?:\.\d+)?"
_REF = rf"{_NUM}(?:-{_NUM})?"
CITATION = re.compile(rf"\b({'|'.join(DOCS)})\.md`*\s*(?:(?:§|sections?\s+)\s*)?({_REF}"
                      rf"(?:\s*(?:,|and)\s*§?\s*{_REF})*)")


def doc_index(path: Path) -> dict[str, set[str]]:
    """Section number -> the item numbers ('1.', '2.' at the start of a line) under that section."""
    index: dict[str, set[str]] = {}
    current = None
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"#{2,4}\s+(\d+(?:\.\d+)*)\.?\s", line)
        if m:
            current = m.group(1)
            index.setdefault(current, set())
            continue
        m = re.match(r"\s*(\d+)\.\s", line)
        if m and current is not None:
            index[current].add(m.group(1))
    return index


def citations() -> list[tuple[str, str, str]]:
    """(file:line, document, reference) for every citation in the tracked text files."""
    out = []
    for path in sorted(ROOT.rglob("*")):
        if (path.suffix not in SUFFIXES or not path.is_file()
                or any(part.startswith(".") or part in {"__pycache__", "runs", "data"}
                       for part in path.relative_to(ROOT).parts)):
            continue
        for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for m in CITATION.finditer(line):
                for ref in re.findall(_REF, m.group(2)):
                    out.append((f"{path.relative_to(ROOT)}:{lineno}", m.group(1), ref))
            if path == ROOT / "docs" / "architecture.md":  # bare '§1.8-2' there: the pipeline document
                for m in re.finditer(rf"(?<![\w.])§\s*({_REF})", line):
                    out.append((f"{path.relative_to(ROOT)}:{lineno}", "pipeline", m.group(1)))
    return list(dict.fromkeys(out))


def unresolved() -> list[str]:
    indexes = {d: doc_index(ROOT / "docs" / f"{d}.md") for d in DOCS}
    bad = []
    for where, doc, ref in citations():
        index = indexes[doc]
        first, _, second = ref.partition("-")
        ok = first in index
        if ok and second:
            # 'A-B' with a dotted B is a range of sections; with a plain B an item of section A or a section
            ok = second in index if "." in second else (second in index[first] or second in index)
        if not ok:
            bad.append(f"{where}: {doc}.md §{ref}")
    return bad


def test_the_facts_documents_exist_in_the_repository():
    for d in DOCS:
        assert (ROOT / "docs" / f"{d}.md").is_file(), d


def test_every_cited_section_exists_in_docs():
    found = citations()
    assert len(found) >= 40, found  # the code cites these documents in dozens of places
    assert unresolved() == []


def test_the_checker_catches_a_missing_section_and_item():
    index = doc_index(ROOT / "docs" / "pipeline.md")
    assert "1.8" in index and {"1", "2", "3"} <= index["1.8"] and "9" in index["6"]
    assert "1.99" not in index and "42" not in index["1.8"]


if __name__ == "__main__":
    for where, doc, ref in citations():
        print(f"{where}: {doc}.md §{ref}")
    problems = unresolved()
    print("\n".join(problems) or "every citation resolves")
    sys.exit(1 if problems else 0)
