"""The README and docs/ stand on their own in a clone: every relative link resolves inside the
repository, nothing points outside it, and the service's URLs are spelled as it prints them."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _references(text: str) -> list[str]:
    """Markdown link targets, and back-quoted documents (``../x/Y.md``, ``docs/a.md``)."""
    links = re.findall(r"\]\(([^)#\s]+)", text)
    quoted = re.findall(r"`((?:\.\./|docs/)[\w./-]+\.md)`", text)
    return [t for t in links + quoted if "://" not in t]


def test_docs_point_only_at_files_in_the_repository() -> None:
    for doc in DOCS:
        text = doc.read_text()
        assert "../shared" not in text and "SPEC.md" not in text, doc
        for target in _references(text):
            path = (doc.parent / target).resolve()
            assert ROOT in path.parents, f"{doc.name}: {target} points outside the repository"
            assert path.exists() or (ROOT / target).exists(), f"{doc.name}: {target} does not exist"


def test_readme_spells_the_service_urls_as_the_service_prints_them() -> None:
    text = (ROOT / "README.md").read_text()
    assert "localhost:9431" not in text and "http://127.0.0.1:9431/metrics" in text
