"""The Flower app's run config, ``[tool.flwr.app.config]`` in pyproject.toml, generated from ``Config``.

``flwr run`` only accepts ``--run-config`` keys listed in that table and takes their values as the
defaults, so the table must hold every ``Config`` key with ``Config``'s default: one source of defaults.
After adding or changing a key in ``common/config.py``, regenerate the table::

    python -m common.app_config            # rewrite the table in ./pyproject.toml
    python -m common.app_config --check    # exit 1, naming the differences, when it is out of date
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from dataclasses import fields
from pathlib import Path

from common.config import Config, toml_value, tomllib

HEADER = "[tool.flwr.app.config]"
INTRO = ("# Generated from common/config.py's Config (`python -m common.app_config`; a test checks it): every key\n"
         "# with its default (flwr only accepts --run-config keys listed here).  Override with\n"
         "# `flwr run . --run-config \"key=value ...\"` or a configs/*.toml file.\n")
FIELD_LINE = re.compile(r"^    (\w+): [\w\[\]| ]+ = ")
GROUP_COMMENT = re.compile(r"^    (# (?!-).*)$")  # "# data", "# model", ...; not the "# ----- parsing" rules


def app_config_table() -> str:
    """The ``[tool.flwr.app.config]`` table: every Config key = its default, in field order, with Config's
    group comments."""
    defaults = Config().to_run_config()
    names = {field.name for field in fields(Config)}
    lines = [INTRO + HEADER]
    for line in inspect.getsource(Config).splitlines():
        field, comment = FIELD_LINE.match(line), GROUP_COMMENT.match(line)
        if field and field.group(1) in names:
            key = field.group(1).replace("_", "-")
            lines.append(f"{key} = {toml_value(defaults[key])}")
        elif comment:
            lines.append(comment.group(1))
    return "\n".join(lines) + "\n"


def table_differences(pyproject_text: str) -> list[str]:
    """How ``[tool.flwr.app.config]`` in ``pyproject_text`` differs from Config's defaults (empty: it agrees)."""
    table = tomllib.loads(pyproject_text).get("tool", {}).get("flwr", {}).get("app", {}).get("config", {})
    defaults = Config().to_run_config()
    return ([f"'{key}' is missing" for key in defaults if key not in table]
            + [f"'{key}' is not a Config key" for key in table if key not in defaults]
            + [f"'{key}' = {table[key]!r}, but Config's default is {defaults[key]!r}"
               for key in defaults if key in table and table[key] != defaults[key]])


def with_generated_table(pyproject_text: str) -> str:
    """``pyproject_text`` with its ``[tool.flwr.app.config]`` table (and the comment block just above it)
    replaced by ``app_config_table()``; the table must be the file's last."""
    head, found, rest = pyproject_text.partition(HEADER)
    if not found or re.search(r"^\[", rest, flags=re.MULTILINE):
        raise ValueError(f"{HEADER} must be the last table of pyproject.toml")
    kept = head.split("\n")[:-1]  # the lines before the header's line
    while kept and kept[-1].startswith("#"):
        kept.pop()
    return "\n".join(kept) + "\n" + app_config_table()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.app_config", description=__doc__.split("\n")[0])
    parser.add_argument("--pyproject", default="pyproject.toml")
    parser.add_argument("--check", action="store_true", help="only report differences (exit 1 if any)")
    args = parser.parse_args(argv)
    path = Path(args.pyproject)
    differences = table_differences(path.read_text())
    if args.check:
        for line in differences:
            print(f"{path} {HEADER}: {line}", file=sys.stderr)
        return 1 if differences else 0
    path.write_text(with_generated_table(path.read_text()))
    print(f"{path}: {HEADER} regenerated ({len(differences)} difference(s) fixed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
