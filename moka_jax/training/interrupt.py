"""SIGINT / SIGTERM during training: finish the step, save, then stop with one line.

    with deferred_signals() as stop:
        for step in ...:
            ...
            if stop.signum is not None:  # save a checkpoint, then
                raise Interrupted(stop.signum, "saved step 12 in ...; run the same command ...")

A signal only records itself while the loop runs, so a step (or a checkpoint being written) is
never cut in half; the loop saves at the next step boundary and raises Interrupted, which the
commands print as one line with exit status 128 + the signal (130 for SIGINT, 143 for SIGTERM).
A second signal while saving raises at once (the user insists; the last complete checkpoint is
kept). Off the main thread, or on a multi-process run (every process must save together), the
handlers are not installed and signals keep their default behaviour.
"""

from __future__ import annotations

import contextlib
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """A run stopped by a signal; .exit_status is 128 + the signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_status = 128 + signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class _Stop:
    signum: int | None = None
    after: str = "the last complete checkpoint is kept"


@contextlib.contextmanager
def deferred_signals(enabled: bool = True):
    """Record SIGINT / SIGTERM in the yielded object (.signum) instead of raising; set .after
    to what a second signal should report. Restores the previous handlers on exit."""
    stop = _Stop()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.signum is not None:
            raise Interrupted(signum, f"interrupted again by {signal_name(signum)} while "
                                      f"stopping; {stop.after}")
        stop.signum = signum

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


__all__ = ["Interrupted", "SIGNALS", "deferred_signals", "signal_name"]
