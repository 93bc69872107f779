"""Errors a user can cause. Front ends show `str(error)` as one line; generate.py exits with `exit_code`."""


class UserError(Exception):
    """Something the user can fix: a wrong path, a missing package, a prompt too long for the context."""

    exit_code = 1


class UsageError(UserError):
    """A malformed command line: unknown flag, bad value, clashing flags (exit code 2, like argparse)."""

    exit_code = 2


def missing_package(package: str, extra: str, purpose: str) -> UserError:
    """The one error for an optional library that is not installed, naming the exact install command."""
    return UserError(f"{purpose} needs the package '{package}', which is not installed: "
                     f"run  pip install -e \".[{extra}]\"  (or  pip install {package})")
