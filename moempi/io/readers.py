"""Reading TOML and JSON input files, with one-line errors naming the file."""

from __future__ import annotations

import json
import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from moempi.errors import MoempiError


def read_toml(path: str, what: str) -> dict:
    """A TOML file as a dict; a missing or malformed file is a MoempiError."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise MoempiError(f"{path}: {what} file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise MoempiError(f"{path}: not valid TOML: {exc}") from None


def read_json(path: str, what: str):
    """A JSON file's content; a missing or malformed file is a MoempiError."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise MoempiError(f"{path}: {what} file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MoempiError(f"{path}: not valid JSON: {exc}") from None
