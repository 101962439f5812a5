"""Comments cite documents inside the repository only, and every ``docs/<file>.md §N`` they cite exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("megatron_spo", "tests", "bench", "examples", "slurm")
SUFFIXES = {".py", ".sh", ".yaml", ".md"}
# Ways the documents outside the repository used to be cited.
OUTSIDE = re.compile(r"(spec §|spec/|spec algorithms|spec engine|Spec §|DESIGN\.md|anchors\.md|shared/notes|"
                     r"notes/megatron_on_cpu)")
CITATION = re.compile(r"docs/([a-z_]+\.md) §(\d+(?:\.\d+)?)")


def _files():
    for top in SCANNED:
        for path in sorted((REPO / top).rglob("*")):
            if path.suffix in SUFFIXES and path.is_file() and "__pycache__" not in path.parts:
                yield path


def _headings(doc: Path):
    return {m.group(1) for m in re.finditer(r"^#+ (?:§)?(\d+(?:\.\d+)?)[. ]", doc.read_text(), re.M)}


def test_no_citation_of_documents_outside_the_repository():
    bad = []
    for path in _files():
        if path == Path(__file__).resolve():
            continue
        for no, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                bad.append(f"{path.relative_to(REPO)}:{no}: {line.strip()[:100]}")
    assert not bad, "cite docs/ instead:\n" + "\n".join(bad)


def test_every_cited_docs_section_exists():
    missing, cited = [], 0
    headings = {doc.name: _headings(doc) for doc in (REPO / "docs").glob("*.md")}
    for path in _files():
        for no, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for m in CITATION.finditer(line):
                cited += 1
                name, section = m.group(1), m.group(2)
                if section not in headings.get(name, set()):
                    missing.append(f"{path.relative_to(REPO)}:{no}: docs/{name} §{section}")
    assert cited > 20  # the package does cite its docs
    assert not missing, "no such section:\n" + "\n".join(missing)
