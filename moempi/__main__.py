"""`python -m moempi`: the same as the `moempi` command."""

from moempi.cli import main

main()
