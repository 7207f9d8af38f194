"""The one exception type lsbench raises for bad user input; the CLI prints it in one line."""


class LsbenchError(Exception):
    """A problem the user can fix (bad model id, layer out of range, corrupt file...)."""
