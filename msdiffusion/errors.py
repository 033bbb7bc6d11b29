"""The one error a command prints as a line (no traceback): something the user asked for cannot work."""


class UserInputError(Exception):
    """A problem with what the user asked for; the message names the input, what is wrong and the fix."""


def did_you_mean(word: object, choices, cutoff: float = 0.6) -> str:
    """' (did you mean 'x'?)' for the closest of `choices` to `word`, or '' when none is close."""
    import difflib

    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=cutoff)
    return f" (did you mean {close[0]!r}?)" if close else ""
