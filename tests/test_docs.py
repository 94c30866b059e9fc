"""The documentation: every node has its help page for ComfyUI's node help panel, and every link in the Markdown
leads to a file (and heading) of this repository."""

import pathlib
import re
import sys

import pytest

import pack_import
from declared_nodes import declared_nodes

ROOT = pack_import.ROOT
HELP_PAGES = ROOT / "web" / "docs"
MARKDOWN = sorted([ROOT / "README.md", ROOT / "bench" / "README.md", *(ROOT / "docs").glob("*.md"),
                   *HELP_PAGES.glob("*.md")])
HELP_SECTIONS = ("## Inputs", "## Outputs", "## Common mistake")


NODES = declared_nodes()


def test_the_node_modules_declare_the_nodes():
    assert len(NODES) >= 20 and all(node_id.startswith("IDA_") for node_id in NODES)


def test_the_pack_serves_its_web_directory():
    # ComfyUI serves WEB_DIRECTORY under /extensions/<pack folder>/, where the frontend looks for docs/<node id>.md
    assert (ROOT / sys.modules["comfyui_idadapter"].WEB_DIRECTORY).resolve() == HELP_PAGES.parent


@pytest.mark.parametrize("node_id", sorted(NODES))
def test_every_node_has_a_help_page(node_id):
    page = HELP_PAGES / f"{node_id}.md"
    assert page.is_file(), f"write {page.relative_to(ROOT)}: what the node does, its inputs, outputs, a common mistake"
    text = page.read_text(encoding="utf-8")
    assert text.startswith(f"# {NODES[node_id]}\n"), "the page starts with the node's display name"
    assert [section for section in HELP_SECTIONS if section not in text] == []


def test_every_help_page_belongs_to_a_node():
    assert sorted(page.stem for page in HELP_PAGES.glob("*.md") if page.stem not in NODES) == []


def heading_anchors(path: pathlib.Path) -> set[str]:
    """The anchors GitHub gives the Markdown headings of ``path``."""
    anchors, in_code = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code  # a fenced block's "# comment" lines are not headings
        elif line.startswith("#") and not in_code:
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("page", MARKDOWN, ids=lambda page: str(page.relative_to(ROOT)))
def test_links_lead_to_files_of_this_repository(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        if not linked.is_relative_to(ROOT) or not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked):
            broken.append(target)
    assert broken == []
