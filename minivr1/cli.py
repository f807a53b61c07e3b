"""Running a script: parse its arguments, run its `main`, and end an error the user caused in one line.

    if __name__ == "__main__":
        cli.run(main, Args, __doc__)

An error the user can fix (a bad data record, a path that does not exist, a server that does not
answer, a run stopped on NaN, a bad argument) is printed as one line on stderr,

    error: runs/x/data.jsonl:line 7: field 'answer': missing. Add an 'answer' field, or ...

and the script exits with status 2, with no traceback. Anything else is a bug and keeps its
traceback. Set the environment variable MINIVR1_DEBUG=1 to see the traceback of every error.
"""
from __future__ import annotations

import os
import sys

EXIT_USER_ERROR = 2


class UserError(Exception):
    """An error the user caused and can fix; its message says what, where, and what to do."""


# Besides UserError: paths that do not exist or cannot be written, and a run stopped on NaN/inf
# (training.check_finite), whose messages say what to do.
USER_ERRORS = (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
               FloatingPointError)


def run(main, args_class, description: str | None = None, argv: list[str] | None = None):
    """Parse `argv` into `args_class` (see minivr1.config), call `main(args)` and return its result;
    a user's error ends the process with one line (see the module docstring)."""
    from minivr1 import config, rundir

    try:
        return main(config.parse_args(args_class, argv, description=description))
    except USER_ERRORS as e:
        if os.environ.get("MINIVR1_DEBUG"):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None
    finally:
        rundir.release_all()               # the output folder's lock (the process's end would drop it too)
