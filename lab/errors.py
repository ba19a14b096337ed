"""Errors a user can fix. The CLI prints their message and exits with status 2, no traceback."""


class LabError(Exception):
    """Something the user can fix: the message says what is wrong and how to fix it."""


class SaidByRank0(LabError):
    """Rank 0's LabError, raised on the other processes of a run to stop them too: rank 0 prints it,
    they exit with status 2 without printing it again."""


def did_you_mean(word: str, choices) -> str:
    """' Did you mean 'x'?' for the closest choice, or '' when nothing is close."""
    import difflib

    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""
