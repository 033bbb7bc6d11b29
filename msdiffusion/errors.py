"""The one error a command prints as a line (no traceback): something the user asked for cannot work."""


class UserInputError(Exception):
    """A problem with what the user asked for; the message names the input, what is wrong and the fix."""
