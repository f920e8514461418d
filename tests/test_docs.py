"""The docs and the example configuration say what the code does: every run-configuration
key is in `input/run-example.toml` and in docs/design.md §2.5, with the code's default."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from moempi.io.config import Config

ROOT = Path(__file__).resolve().parent.parent
PATHS = {"run.model", "run.tokens", "run.output"}       # the example names files


def _code() -> dict:
    return {f"{s}.{k}": v for s, table in Config().to_dict().items() for k, v in table.items()}


def test_example_config_lists_every_key_at_its_default():
    text = (ROOT / "input" / "run-example.toml").read_text()
    example = tomllib.loads(text)
    keys = {f"{s}.{k}": v for s, table in example.items() for k, v in table.items()}
    code = _code()
    assert set(keys) == set(code), (set(code) ^ set(keys))
    for key, value in keys.items():
        if key not in PATHS:
            assert value == code[key] and type(value) is type(code[key]), key
    # every key says what it does, on its own line
    for line in text.splitlines():
        if re.match(r"^[a-z_]+ = ", line):
            assert "#" in line and len(line.split("#", 1)[1].strip()) > 10, line
    assert "only 1 in this version" not in text     # tp is implemented


def test_design_table_lists_every_key_with_the_code_default():
    rows = re.findall(r"^\| `((?:run|parallel|pipeline|balance|backend)\.[a-z_]+)` \| "
                      r"(\w+) \| ([^|]+) \|", (ROOT / "docs" / "design.md").read_text(), re.M)
    documented = {key: (kind, default.strip().strip("`")) for key, kind, default in rows}
    code = _code()
    assert set(documented) == set(code), set(documented) ^ set(code)
    kinds = {"str": str, "string": str, "bool": bool, "int": int, "float": float}
    for key, (kind, default) in documented.items():
        assert kinds[kind] is type(code[key]), key
        assert tomllib.loads(f"v = {default}")["v"] == code[key], key
