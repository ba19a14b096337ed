"""Errors a user can fix. The CLI prints their message and exits with status 2, no traceback."""

import os
import traceback


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


# Set (to anything but "" or 0), the CLI prints the traceback of a plugin's error before its message;
# `lab --debug COMMAND` does the same.
DEBUG_ENV = "LAB_DEBUG"


class PluginError(LabError):
    """Plugin code (a component's factory, its check_recipe, a hook) raised something other than a
    LabError: said with the package's name, exit status 2; its traceback is kept, printed with
    `lab --debug` or LAB_DEBUG=1, and is the cause of this exception."""

    def __init__(self, package: str, what: str, error: BaseException):
        self.package, self.traceback = package, "".join(traceback.format_exception(error))
        super().__init__(
            f"plugin package '{package}' failed in {what}: {type(error).__name__}: {error}. "
            f"Its traceback: lab --debug COMMAND ... (or {DEBUG_ENV}=1); report it to that package's authors"
        )


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def plugin_error(package: str, what: str, error: BaseException) -> LabError:
    """What to raise for an error from plugin code: a LabError as it is, anything else a PluginError."""
    return error if isinstance(error, LabError) else PluginError(package, what, error)
