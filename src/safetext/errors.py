"""The one exception type that reaches users as a single line (the CLI prints it and exits with code 2)."""


class SafeTextError(Exception):
    """Bad input or a run that cannot go on: the message is written for the person at the terminal."""
