"""`python -m hkft` is the `hkft` command."""

from hkft.cli import app

app(prog_name="hkft")
