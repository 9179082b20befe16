"""The one exception type that reaches users as a single line on stderr with exit code 2."""


class FruitpipeError(Exception):
    """A problem the user can fix (bad input, bad configuration); its message is the whole story."""
