"""Project error types. The CLI turns a `UserError` into one line and exit code 2, any other
`NanoforgeError` into one line and exit code 1; nothing else is caught, so real bugs keep their traceback."""


class NanoforgeError(Exception):
    """A failure the user can act on; `exit_code` is what the CLI exits with."""

    exit_code = 1


class UserError(NanoforgeError):
    """Bad input: a missing file, a wrong flag, a mismatched artifact. Exit code 2."""

    exit_code = 2


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that the same cleanup runs (temporaries removed,
    the old output kept); the CLI exits 143."""
