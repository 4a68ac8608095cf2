"""The README is the front door and the guides in docs/ are found from it.

The README stays short (the manual lives in docs/), every relative link in
the README and the guides reaches a file that exists (and a ``#anchor`` a
heading of that file), and every guide in docs/ is linked from the README,
so a newcomer finds each one by its name.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
README_MAX_LINES = 300

# [text](target) and ![alt](target); the target ends at whitespace or ")".
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"`+[^`]*`+")


def prose(text: str) -> str:
    """The text without fenced blocks and code spans, where a `[x](y)` is code, not a link."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(CODE_SPAN.sub("", line))
    return "\n".join(lines)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = CODE_SPAN.sub(lambda m: m.group(0).strip("`"), heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading anchors on its text
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in a Markdown file, with GitHub's -1, -2 ... for repeated ones."""
    seen: dict[str, int] = {}
    found = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if fenced or not heading:
            continue
        base = slug(heading.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links(path: Path) -> list[str]:
    return [t for t in LINK.findall(prose(path.read_text(encoding="utf-8")))
            if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.IGNORECASE)]  # http:, https:, mailto: ...


def documents() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def test_slug_follows_githubs_rule():
    # The rule the anchors below are checked with, on headings of the kinds these files have.
    assert slug("The suite's time per CPU kind (CI's run)") == "the-suites-time-per-cpu-kind-cis-run"
    assert slug("Elastic: lose a host, keep training, grow back") == "elastic-lose-a-host-keep-training-grow-back"
    assert slug("Throughput at max_len 400 (target ≥ 3.0×)") == "throughput-at-max_len-400-target--30"
    assert slug("`fast.yaml`: two epochs") == "fastyaml-two-epochs"


def test_readme_is_the_front_door_not_the_manual():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines: move the detail into a guide in docs/"


def broken_links(doc: Path) -> list[str]:
    """Each relative link of ``doc`` whose file, or whose ``#anchor`` in that file, does not exist."""
    broken = []
    for target in relative_links(doc):
        where, _, anchor = target.partition("#")
        dest = (doc.parent / where).resolve() if where else doc
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest}")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            shown = dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest.name
            broken.append(f"{target}: no heading with anchor #{anchor} in {shown}")
    return broken


@pytest.mark.parametrize("doc", documents(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_reaches_a_file_and_heading(doc: Path):
    broken = broken_links(doc)
    assert not broken, f"{doc.relative_to(REPO)}: " + "; ".join(broken)


def test_every_guide_is_linked_from_the_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in relative_links(README)}
    guides = {p.resolve() for p in DOCS.glob("*.md")}
    assert guides, "docs/ holds no guide"
    missing = sorted(str(p.relative_to(REPO)) for p in guides - linked)
    assert not missing, f"guides in docs/ that the README does not link: {missing}"


def test_link_check_catches_a_broken_link_and_a_missing_anchor(tmp_path: Path):
    # The checks above must fail on the bugs they are about: a link to a file that is not there,
    # and an anchor no heading of the target has.
    (tmp_path / "guide.md").write_text("# A guide\n\n## Run it\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text("[ok](guide.md#run-it) [gone](nowhere.md) [typo](guide.md#run-it-now) `[code](x.md)`\n",
                    encoding="utf-8")
    broken = broken_links(page)
    assert [entry.split(":", 1)[0] for entry in broken] == ["nowhere.md", "guide.md#run-it-now"], broken
    assert "no file" in broken[0] and "no heading with anchor #run-it-now" in broken[1]
