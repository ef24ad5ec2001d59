"""The error a user can cause and fix: printed by the CLI as one line, no traceback.

A bad config value, a missing or corrupt file, a workdir of another run, a missing weights
file: each raises `UserError` with a message that names the field or file and what would be
accepted. Everything else (a bug) keeps its traceback. `UserError` is a `ValueError`, so code
that catches ValueError around validation keeps working.
"""


class UserError(ValueError):
    """A mistake in the user's input (config, paths, files); the message says how to fix it."""
