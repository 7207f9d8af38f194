"""The one exception type lsbench raises for bad user input; the CLI prints it in one line."""


class LsbenchError(Exception):
    """A problem the user can fix (bad model id, layer out of range, corrupt file...)."""


def one_line(text: object, limit: int = 300) -> str:
    """A library's message folded onto one line and capped, for an error line of our own."""
    flat = " ".join(str(text).split()) or type(text).__name__
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
