"""The README and docs/ pages: every relative link resolves, the README stays a front door, and
docs/architecture.md names exactly the modules that exist."""

from __future__ import annotations

import re
from pathlib import Path

from test_layout import import_graph

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MAX_README_LINES = 250

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)


def links(text: str) -> list[str]:
    """Markdown link and image targets outside code blocks and inline code."""
    text = FENCE.sub("", text)
    text = re.sub(r"`[^`\n]*`", "", text)
    return LINK.findall(text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*|_(?=\w)|(?<=\w)_", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, re.M)}


def broken_links(pages: list[Path], root: Path = REPO) -> list[str]:
    """``page: target (why)`` for every relative link of ``pages`` that does not resolve."""
    broken = []
    for page in pages:
        for target in links(page.read_text()):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ... : not ours to check
                continue
            path_part, _, fragment = target.partition("#")
            resolved = (page.parent / path_part).resolve() if path_part else page
            where = f"{page.relative_to(root)}: {target}"
            if not resolved.exists():
                broken.append(f"{where} (no such file)")
            elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
                broken.append(f"{where} (no heading #{fragment})")
    return broken


def test_every_relative_link_in_the_readme_and_docs_resolves():
    assert len(PAGES) >= 9  # README and the docs pages
    assert broken_links(PAGES) == []


def test_the_link_checker_finds_missing_files_and_anchors(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## A `code` heading, with punctuation!\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md) [ok](other.md#a-code-heading-with-punctuation) ![ok](other.md) [web](https://example.org/x)\n"
        "[gone](missing.md) [bad anchor](other.md#nope) `[in code](missing2.md)`\n"
        "```\n[in a block](missing3.md)\n```\n"
    )
    assert broken_links([page], root=tmp_path) == ["page.md: missing.md (no such file)",
                                                   "page.md: other.md#nope (no heading #nope)"]


def test_the_readme_is_a_front_door():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README has {len(lines)} lines; move details to a docs/ page"


def ownership_table() -> list[tuple[str, str]]:
    """``(layer, module path)`` rows of docs/architecture.md's "| layer | `module.py` | what it owns |" table."""
    text = (REPO / "docs" / "architecture.md").read_text()
    return re.findall(r"^\| (\w+) \| `([\w/]+\.py)` \|", text, re.M)


def test_the_architecture_page_names_exactly_the_modules_that_exist():
    package = REPO / "src" / "mnistrec"
    modules = {p.relative_to(package).as_posix() for p in package.rglob("*.py")}
    table = [module for _, module in ownership_table()]
    assert len(table) == len(set(table)), "a module is listed twice"
    assert sorted(modules - set(table)) == [], "modules missing from docs/architecture.md"
    assert sorted(set(table) - modules) == [], "docs/architecture.md names modules that do not exist"


def test_imports_only_go_down_the_architecture_pages_layers():
    rows = ownership_table()
    layers = list(dict.fromkeys(layer for layer, _ in rows))  # in the page's order, lowest first
    assert len(layers) >= 5
    rank = {"mnistrec." + path.removesuffix(".py").removesuffix("/__init__").replace("/", "."): layers.index(layer)
            for layer, path in rows}
    rank["mnistrec"] = rank.pop("mnistrec.__init__")
    upward = [f"{a} ({layers[rank[a]]}) imports {b} ({layers[rank[b]]})"
              for a, targets in import_graph(REPO / "src", "mnistrec").items() for b in sorted(targets)
              if rank[b] > rank[a]]
    assert upward == [], "reorder docs/architecture.md's table or move the code"
