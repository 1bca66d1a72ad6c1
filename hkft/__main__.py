"""`python -m hkft` is the `hkft` command."""

from hkft.cli import app

if __name__ == "__main__":
    app(prog_name="hkft")
