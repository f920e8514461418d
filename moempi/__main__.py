"""`python -m moempi`: the same as the `moempi` command."""

from .cli import main

main()
