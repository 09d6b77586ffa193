"""The one exception type users see: a single line naming the problem and the fix."""


class PeftlabError(Exception):
    """Bad input from a user (config, data, checkpoint, flag). The CLI prints it as one line."""


def first_line(error: BaseException, limit: int = 150) -> str:
    """The first line of an exception's message (or its type name), for embedding in a one-line error."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__
