"""Where a command's errors become one line and an exit status: every main() is `guarded`.

    @guarded("moka-export", ValueError, FileNotFoundError)  # the command's own bad input
    def main(argv=None) -> int: ...

status  what
2       the input is wrong (user_errors() and the command's own): "error: ..."
74      a full disk or quota on any write (support.diskfull): the path and what is intact
1       a training run that diverged (the last good checkpoint is kept)
130/143 SIGINT / SIGTERM: where the run saved and how to resume (training.interrupt),
        or, outside a training loop, that the command stopped
A bug (anything else) keeps its traceback.
"""

from __future__ import annotations

import functools
import signal
import sys

DISK_FULL = 74  # os.EX_IOERR
DIVERGED = 1


def user_errors() -> tuple:
    """Errors that mean "the input is wrong" (exit status 2), as opposed to bugs."""
    from moka_jax.config import ConfigError
    from moka_jax.data.records import DataError
    from moka_jax.io.attach import AdapterMismatch
    from moka_jax.support.files import FileCheckError
    from moka_jax.support.outputs import OutputError
    from moka_jax.support.trees import CheckpointError

    return (ConfigError, DataError, FileCheckError, CheckpointError, OutputError,
            AdapterMismatch)


def one_line(e: BaseException, prog: str, extra: tuple = ()) -> tuple[int, str] | None:
    """(exit status, the line to print) for a fault the user can act on; None for a bug."""
    from moka_jax.support.diskfull import as_disk_full
    from moka_jax.training.interrupt import Interrupted
    from moka_jax.training.loop import TrainingDiverged

    if isinstance(e, SystemExit):
        return None
    if isinstance(e, Interrupted):
        return e.exit_status, f"{prog}: {e}"
    if isinstance(e, KeyboardInterrupt):
        return 128 + signal.SIGINT, (f"{prog}: interrupted by SIGINT; outputs are written whole "
                                     "or not at all, so nothing half-written was kept")
    full = as_disk_full(e, "an output") if isinstance(e, Exception) else None
    if full is not None:
        return DISK_FULL, f"{prog}: error: {full}"
    if isinstance(e, TrainingDiverged):
        return DIVERGED, f"{prog}: error: {e}"
    if isinstance(e, (*user_errors(), *extra)):
        return 2, f"error: {e}"
    return None


def guarded(prog: str, *extra: type[BaseException]):
    """Decorate a main(argv) -> int: known faults print one line and return their status.
    extra: what else counts as bad input (status 2) for this command."""

    def wrap(main):
        @functools.wraps(main)
        def run(argv=None) -> int:
            try:
                return main(argv)
            except BaseException as e:
                known = one_line(e, prog, extra)
                if known is None:
                    raise
                print(known[1], file=sys.stderr, flush=True)
                return known[0]
        return run
    return wrap


__all__ = ["DISK_FULL", "DIVERGED", "guarded", "one_line", "user_errors"]
