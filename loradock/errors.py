"""Errors of the CLI package that are the user's to fix."""


class UserError(Exception):
    """A problem with the user's input or environment, printed without a traceback (exit 2)."""
