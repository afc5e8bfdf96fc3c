"""The README is a front page that stays true: its two commands first, at most 300 lines, a Python example
whose imports exist, and every relative link in it and in docs/ pointing at a file and heading that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors_of(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    heads = [line.lstrip("#").strip() for line in path.read_text().splitlines() if line.startswith("#")]
    return {re.sub(r"[^a-z0-9 _-]", "", head.lower()).replace(" ", "-") for head in heads}


def test_readme_starts_with_the_two_commands_and_stays_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300
    first_block = lines[lines.index("```bash") + 1 : lines.index("```")]
    assert "bash scripts/install.sh && .venv/bin/reclm run --dataset ml-100k" in first_block[0]
    assert first_block[1].startswith(".venv/bin/python -m pytest -q")
    assert lines.index("```bash") < 5


def test_the_readme_python_example_imports_what_exists():
    text = (ROOT / "README.md").read_text()
    example = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    imports = "\n".join(line for line in example.splitlines() if line.startswith(("from ", "import ")))
    assert imports.count("import") >= 3
    exec(compile(imports, "README.md", "exec"), {})


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_relative_link_resolves(doc: Path):
    broken = []
    for target in LINK.findall(doc.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file_part, _, anchor = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        if not path.exists() or anchor and path.suffix == ".md" and anchor not in anchors_of(path):
            broken.append(target)
    assert not broken, f"{doc.name}: {broken}"
