"""The one exception type users see: a single line naming the problem and the fix."""


class PeftlabError(Exception):
    """Bad input from a user (config, data, checkpoint, flag). The CLI prints it as one line."""
