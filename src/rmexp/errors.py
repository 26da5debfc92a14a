"""Errors a user can act on, told apart from bugs.

`UserError` is the base of every error whose message alone says what to change: a config value
(`ConfigError`), a preference file or record (`DataError`), a path that is not there (`MissingPathError`),
a run dir or checkpoint a run refuses (`RunDirError`, `CheckpointError`), a resume that would continue
another run (`ResumeConflict`), a format no reader takes, a server that cannot start. Every console script
prints one as `error: <message>` on stderr and exits 1 without a traceback (rmexp.console);
`HYDRA_FULL_ERROR=1` shows the traceback. Any other exception is a bug and keeps its traceback.

Each class also derives from the builtin that callers caught before it existed (ValueError,
FileNotFoundError, RuntimeError), so `except ValueError` still catches a DataError.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user fixes by changing a command, a config value, a file or a path; the message names which."""


class MissingPathError(UserError, FileNotFoundError):
    """A file or dir the config names that is not there (a data file, a checkpoint, a run dir)."""
