"""docs/configuration.md is generated from the config's dataclasses, and every key there has its one-line meaning."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import re
import sys
from pathlib import Path

import pytest
from conftest import REPO

from imdb_dist.config import reference

DOC = REPO / "docs" / "configuration.md"
REGENERATE = f"regenerate it with `{reference.COMMAND}`"


def config_keys() -> list[str]:
    """Every dotted key of the config, from its dataclasses."""
    return [f"{name}.{f.name}" for name, section in reference.sections() for f in dataclasses.fields(section)]


def documented_keys(text: str) -> list[str]:
    """The keys in the first column of the reference's tables."""
    return re.findall(r"^\| `([a-z_]+\.[a-z_0-9]+)` \|", text, flags=re.MULTILINE)


def undocumented(section: type) -> list[str]:
    """The fields of ``section`` with no one-line meaning: no string after the field, an empty one, or paragraphs."""
    meanings = reference.field_meanings(section)
    written = reference.field_docstrings(section)
    return [
        f.name
        for f in dataclasses.fields(section)
        if not meanings.get(f.name) or "\n\n" in written[f.name].strip()
    ]


def test_the_checked_in_reference_is_what_the_dataclasses_generate() -> None:
    expected = reference.render()
    actual = DOC.read_text(encoding="utf-8")
    diff = "".join(
        difflib.unified_diff(actual.splitlines(True), expected.splitlines(True), "docs/configuration.md", "generated")
    )
    assert actual == expected, f"docs/configuration.md is stale: {REGENERATE}\n{diff[:3000]}"


def test_the_reference_documents_exactly_the_configs_keys() -> None:
    # Named keys, not a diff: a key added without its line, or a line left for a key that is gone.
    documented = documented_keys(DOC.read_text(encoding="utf-8"))
    keys = config_keys()
    missing = sorted(set(keys) - set(documented))
    gone = sorted(set(documented) - set(keys))
    assert not missing and not gone, f"keys with no line: {missing}; lines for keys that are gone: {gone}; {REGENERATE}"
    assert documented == keys, "each key once, in the dataclasses' order"


@pytest.mark.parametrize(("name", "section"), reference.sections(), ids=[name for name, _ in reference.sections()])
def test_every_field_has_a_one_line_meaning(name: str, section: type) -> None:
    assert undocumented(section) == [], (
        f"{section.__name__} fields without a one-line meaning (a string right after the field): "
        f"{undocumented(section)}"
    )
    assert section.__doc__ and section.__doc__.strip(), f"{section.__name__} needs a docstring: the {name} table's summary"


def test_a_field_without_its_line_is_caught(tmp_path: Path) -> None:
    # The checks above on a section that has the faults they are about.
    module = tmp_path / "sections_under_test.py"
    module.write_text(
        "import dataclasses\n\n\n"
        "@dataclasses.dataclass(frozen=True)\n"
        "class Section:\n"
        '    """A section."""\n\n'
        "    documented: int = 1\n"
        '    """What it means."""\n'
        "    # A comment is not a meaning.\n"
        "    commented: int = 2\n"
        "    empty: int = 3\n"
        '    """ """\n'
        "    paragraphs: int = 4\n"
        '    """One paragraph.\n\n    And another."""\n',
        encoding="utf-8",
    )
    spec = importlib.util.spec_from_file_location("sections_under_test", module)
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = loaded
    try:
        spec.loader.exec_module(loaded)
        assert undocumented(loaded.Section) == ["commented", "empty", "paragraphs"]
        assert reference.field_meanings(loaded.Section)["documented"] == "What it means."
    finally:
        del sys.modules[spec.name]


def test_a_stale_reference_names_the_key() -> None:
    text = reference.render()
    stale = text.replace("| `train.epochs` |", "| `train.epochz` |")
    assert "train.epochs" not in documented_keys(stale) and "train.epochz" in documented_keys(stale)


def test_the_tables_show_types_and_defaults_as_yaml_writes_them() -> None:
    text = reference.render()
    rows = {key: line for key in config_keys() for line in text.splitlines() if line.startswith(f"| `{key}` |")}
    assert rows["data.path"].startswith("| `data.path` | str or null | `null` |")
    assert rows["data.bucketing"].startswith("| `data.bucketing` | bool | `true` |")
    assert rows["distribution.devices"].startswith("| `distribution.devices` | list of str | `[]` |")
    assert rows["ray.num_workers"].startswith("| `ray.num_workers` | int or [int, int] | `2` |")
    assert rows["ray.resources_per_worker"].startswith(
        "| `ray.resources_per_worker` | mapping of str to float | `{CPU: 1.0}` |"
    )
    assert rows["train.lr_schedule"].startswith("| `train.lr_schedule` | one of `constant`, `cosine` | `constant` |")
    # Every row has its four cells: no `|` inside a cell broke the table.
    assert all(line.count(" | ") == 3 for line in rows.values()), [r for r in rows.values() if r.count(" | ") != 3]


def test_the_command_prints_or_writes_it_and_refuses_other_arguments(tmp_path, capsys, monkeypatch) -> None:
    assert reference.main([]) == 0
    assert capsys.readouterr().out == reference.render()
    target = tmp_path / "configuration.md"
    monkeypatch.setattr(reference, "DOC", target)
    assert reference.main(["--write"]) == 0
    assert target.read_text(encoding="utf-8") == reference.render()
    capsys.readouterr()
    assert reference.main(["--writ"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--writ" in err, err
