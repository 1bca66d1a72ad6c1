"""`hkft env`: versions and devices for bug reports."""

from __future__ import annotations

from hkft.commands.common import print_table, user_errors


@user_errors
def env() -> None:
    """Versions, device and bitsandbytes support, for bug reports."""
    from hkft.run.environment import environment_report

    print_table(environment_report(), "hkft env", ("component", "version / status"))
