"""Errors a user can cause. The CLI turns a UserError into one line and exit code 2."""


class UserError(Exception):
    """A problem with the user's input (path, bits, checkpoint, data, profile)."""

    exit_code = 2


class GateFailed(Exception):
    """A validation gate did not pass: exit code 1."""

    exit_code = 1
