"""docs/configuration.md, generated from the config's sections: every key, its type, default and meaning.

    python -m imdb_dist.config.reference --write    # rewrite docs/configuration.md
    python -m imdb_dist.config.reference            # print it

Each key's meaning is the string right after its field in the section's
dataclass (an attribute docstring, read here with :mod:`ast`), so a key and
its line change together; tests/test_config_reference.py fails when the
checked-in file is not what this prints.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

from imdb_dist.config.loading import flow, type_words
from imdb_dist.config.schema import Config
from imdb_dist.errors import ArgumentParser

# The checkout's docs/: --write is for a working tree, where the package sits beside docs/.
DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
COMMAND = "python -m imdb_dist.config.reference --write"

HEADER = f"""\
# Configuration reference

<!-- Generated from the config dataclasses (imdb_dist/config/job.py and
cluster.py) by `{COMMAND}`: edit a field's line there, not here. -->

A job is configured in three layers, each overriding the one before:

1. the defaults below;
2. a YAML file, `--config FILE` (the presets are in `job/configs/`);
3. `--set key=value` on the command line, repeatable, applied in order
   (`--set train.epochs=5 --set data.path=/data/aclImdb_v1.tar.gz`). The value
   is read as YAML, so `--set ray.num_workers=[2,4]` is a list and
   `--set data.path=null` is null.

So `--set` > YAML > defaults. The YAML file mirrors the dotted keys, one
mapping per section; a file need name only the keys it changes:

```yaml
data:
  path: ../shared/data/imdb/aclImdb_train.tar.gz
train:
  epochs: 5
  learning_rate: 2e-3
ray:
  resources_per_worker: {{CPU: 8, GPU: 8}}
tune:
  space:
    train.learning_rate: {{loguniform: [0.0005, 0.005]}}
```

Every value is checked when the config is read, before any data is: an
unknown key, a value of the wrong type (`true` is no count, `1` no flag) or
out of its key's range (and the few rules that join two keys, such as
`data.max_len` covering the first convolution and pooling window) stops the
command with one line naming the key, `error: config key train.epochs: 0 is
out of range [1, 100000]`, and exit status 2. Each run directory keeps the
resolved config as `config.yaml`.

**Credentials never go in a config.** A location (`data.path`, `data.url`,
`run.output_dir`, `ray.storage_path`) that carries them, as userinfo
(`s3://KEY:SECRET@bucket`) or a secret query key, is refused the same way:
configs are stored with every run and printed in logs. Storage clients take
their credentials from the environment (`AWS_ACCESS_KEY_ID` and
`AWS_SECRET_ACCESS_KEY`, an instance or pod role,
`GOOGLE_APPLICATION_CREDENTIALS`, ...).
"""


def field_docstrings(section: type) -> dict[str, str]:
    """Each field of the dataclass ``section`` that has a string right after it: that string, as written."""
    tree = ast.parse(Path(inspect.getsourcefile(section) or "").read_text(encoding="utf-8"))
    (node,) = (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == section.__name__)
    docstrings = {}
    for stmt, after in zip(node.body, node.body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docstrings[stmt.target.id] = after.value.value
    return docstrings


def field_meanings(section: type) -> dict[str, str]:
    """Each documented field of ``section`` and its meaning on one line (a table cell)."""
    return {name: " ".join(text.split()) for name, text in field_docstrings(section).items()}


def sections() -> list[tuple[str, type]]:
    """Each section of :class:`Config`, in order: its key (``data``) and its dataclass."""
    hints = typing.get_type_hints(Config)
    return [(field.name, hints[field.name]) for field in dataclasses.fields(Config)]


def rows(section: type) -> list[tuple[str, str, str]]:
    """``(field, type, default)`` of every field of ``section``, in order."""
    hints = typing.get_type_hints(section)
    defaults = section()
    return [(f.name, type_words(hints[f.name]), flow(getattr(defaults, f.name))) for f in dataclasses.fields(section)]


def render() -> str:
    """The whole of docs/configuration.md: the header, then one table per section."""
    parts = [HEADER]
    for name, section in sections():
        # The docstring's first paragraph, its reST literals as Markdown's.
        summary = " ".join((section.__doc__ or "").strip().split("\n\n")[0].split()).replace("``", "`")
        meanings = field_meanings(section)
        lines = [f"## `{name}`", "", summary, "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for field, words, default in rows(section):
            cells = (f"`{name}.{field}`", words, f"`{default}`", meanings.get(field, ""))
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the reference, or with ``--write`` rewrite :data:`DOC`; exit 2 on any other argument."""
    parser = ArgumentParser(prog="python -m imdb_dist.config.reference", description=__doc__.splitlines()[0],
                            allow_abbrev=False)
    parser.add_argument("--write", action="store_true", help=f"rewrite {DOC.relative_to(DOC.parents[1])}")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    text = render()
    if not args.write:
        sys.stdout.write(text)
        return 0
    DOC.write_text(text, encoding="utf-8")
    print(f"wrote {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
