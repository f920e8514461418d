"""The package's shape: layers kept (import-linter), token collectives in dispatch alone,
every cited section of docs/design.md present, every file a --help example names present."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import click
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "moempi"
# MPI collectives that move tokens; the counts exchange (Alltoall) is dispatch's too
TOKEN_COLLECTIVES = {"Alltoallv", "Ialltoallv", "Alltoallw", "Ialltoallw", "Alltoall",
                     "Ialltoall", "Neighbor_alltoallv", "Ineighbor_alltoallv"}
# the one exception: the benchmark's raw Alltoallv, the baseline dispatch is measured against
TOKEN_COLLECTIVE_EXCEPTIONS = {"moempi/measure/bench.py"}


def test_import_layers_hold():
    """The import-linter contracts of setup.cfg: layers, and who may import MPI, cupy, click."""
    linter = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(linter), "--config", str(ROOT / "setup.cfg")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


def test_only_dispatch_calls_token_collectives():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel in ("moempi/runtime/dispatch.py", *TOKEN_COLLECTIVE_EXCEPTIONS):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in TOKEN_COLLECTIVES:
                offenders.append(f"{rel}:{node.lineno} {node.attr}")
    assert not offenders, offenders


def test_every_module_and_subpackage_says_what_it_is():
    for path in PACKAGE.rglob("*.py"):
        doc = ast.get_docstring(ast.parse(path.read_text()))
        if path.name == "__main__.py":
            continue
        assert doc, f"{path.relative_to(ROOT)} has no docstring"
        if path.name == "__init__.py" and path.parent != PACKAGE:
            assert len(doc.split()) >= 12, f"{path.relative_to(ROOT)}: say what it is for"


def design_sections() -> set[str]:
    text = (ROOT / "docs" / "design.md").read_text()
    return {m.group(1) for m in re.finditer(r"^#+\s+(\d+(?:\.\d+)*)\.?\s", text, re.M)}


def test_every_cited_section_of_the_design_exists():
    sections = design_sections()
    assert {"1", "2", "2.1", "2.3", "2.4", "2.5", "3", "4"} <= sections
    cited = []
    files = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *PACKAGE.rglob("*.py"),
             *(ROOT / "tests").glob("*.py"), *(ROOT / "input").glob("*"),
             *(ROOT / "jobs").glob("*")]
    for path in files:
        for m in re.finditer(r"design\.md\s*§\s*(\d+(?:\.\d+)*)", path.read_text()):
            cited.append((path.relative_to(ROOT).as_posix(), m.group(1)))
    assert cited, "nothing cites docs/design.md"
    missing = [(f, s) for f, s in cited if s not in sections]
    assert not missing, missing
    assert "DESIGN.md" not in (ROOT / "README.md").read_text()


def help_texts():
    from moempi.cli import cli

    def walk(cmd, path):
        yield path, CliRunner().invoke(cli, [*path, "--help"]).output
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                yield from walk(sub, [*path, name])
    yield from walk(cli, [])


def test_every_file_a_help_example_names_exists():
    named = []
    for path, text in help_texts():
        assert text.strip(), f"moempi {' '.join(path)} --help printed nothing"
        for m in re.finditer(r"(?<![\w/])((?:input|jobs|docs|tests)/[\w./-]*\w)", text):
            named.append((" ".join(path), m.group(1)))
    assert named, "no --help names a file of the repository"
    missing = [(cmd, f) for cmd, f in named if not (ROOT / f).exists()]
    assert not missing, missing
