"""The reference docs in docs/: every link into them points at a heading that exists, every
test that docs/traps.md names exists, and the MkDocs site (with the API reference) builds."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def anchors(doc: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces turned into hyphens."""
    out = set()
    for line in doc.read_text().splitlines():
        m = re.match(r"#+\s+(.*)", line)
        if m:
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return out


def test_every_link_into_docs_names_an_existing_heading():
    sources = [*ROOT.glob("src/**/*.py"), *ROOT.glob("src/**/*.yaml"), *ROOT.glob("tests/*.py"), *ROOT.glob("*.md")]
    links = []
    for path in sources:
        links += [(path, *m) for m in re.findall(r"docs/(\w+)\.md#([\w-]+)", path.read_text())]
    for doc in DOCS.glob("*.md"):  # links between the docs: (traps.md#x), (#x)
        links += [(doc, *m) for m in re.findall(r"\]\((\w+)\.md#([\w-]+)\)", doc.read_text())]
        links += [(doc, doc.stem, a) for a in re.findall(r"\]\(#([\w-]+)\)", doc.read_text())]
    assert links
    for path, name, anchor in links:
        doc = DOCS / f"{name}.md"
        assert doc.is_file(), f"{path.relative_to(ROOT)} links to {doc.relative_to(ROOT)}, which does not exist"
        assert anchor in anchors(doc), f"{path.relative_to(ROOT)}: no heading for {name}.md#{anchor}"


def test_tests_named_in_the_docs_exist():
    defined = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", path.read_text(), flags=re.M))
    for doc in DOCS.glob("*.md"):
        for name in re.findall(r"`(test_\w+)`", doc.read_text()):
            assert name in defined, f"{doc.name} names {name}, which no test defines"


def test_the_docs_site_builds_strictly(tmp_path):
    """mkdocs.yml, the pages and the API reference (mkdocstrings reads the docstrings): any
    warning (a broken link, a `:::` reference that does not resolve, a docstring it cannot
    parse) fails the build. Skipped where the docs extra is not installed (`.[docs]`)."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, f"mkdocs build --strict failed:\n{out.stdout}\n{out.stderr}"
    assert (tmp_path / "site" / "api" / "index.html").is_file()
