"""Run the customer's CMD: stdio passed through, signals forwarded, its status returned the way a shell reports it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from types import FrameType

from gbx_client.errors import printable

# What a job runner sends to stop or poke a job; gbx passes each on to CMD. SIGKILL and SIGSTOP
# cannot be caught: they stop gbx, and the run stays started until gbx runs again.
FORWARDED = tuple(
    getattr(signal, name)
    for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGWINCH")
    if hasattr(signal, name)
)
# Keys typed at a terminal (Ctrl-C, Ctrl-\) already reach CMD when gbx is the terminal's
# foreground process group: forwarding them as well would deliver them twice.
TERMINAL_SIGNALS = frozenset(getattr(signal, name) for name in ("SIGINT", "SIGQUIT") if hasattr(signal, name))


# linux/prctl.h: the signal a process gets when its parent dies.
PR_SET_PDEATHSIG = 1

# The runner's bearer token is gbx's, not the job's: CMD never sees it.
WITHHELD_FROM_CMD = ("GBX_ID_TOKEN",)


def run_command(argv: list[str]) -> int:
    """Run CMD to its end and return its exit status: its own code, 128+N when signal N ended it, 126/127 when it could not start."""
    child: list[subprocess.Popen[bytes]] = []
    pending: list[int] = []
    from_terminal = _in_terminal_foreground()

    def forward(signum: int, _frame: FrameType | None) -> None:
        if from_terminal and signum in TERMINAL_SIGNALS:
            return
        if child:
            _send(child[0], signum)
        else:
            pending.append(signum)  # arrived while CMD was starting: delivered once it exists

    # Handlers before Popen: a SIGTERM landing during start-up must not kill gbx and orphan CMD.
    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED}
    try:
        try:
            env = {name: value for name, value in os.environ.items() if name not in WITHHELD_FROM_CMD}
            child.append(subprocess.Popen(argv, env=env, preexec_fn=_dies_with(os.getpid()) if sys.platform == "linux" else None))
        except FileNotFoundError:
            print(f"gbx: {printable(argv[0])}: command not found", file=sys.stderr)
            return 127
        except PermissionError:
            print(f"gbx: {printable(argv[0])}: permission denied", file=sys.stderr)
            return 126
        for signum in pending:
            _send(child[0], signum)
        # wait() resumes after each handled signal (PEP 475), so forwarding never abandons CMD.
        status = child[0].wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 128 - status if status < 0 else status


def _dies_with(parent: int) -> Callable[[], None]:
    """A preexec_fn (Linux): CMD gets SIGKILL when gbx dies, even by SIGKILL, so no orphan outlives a killed gbx.

    The kernel sends the parent-death signal when the thread that forked CMD ends; that is gbx's main thread,
    which lives until gbx exits. CMD's own children are not covered: they are CMD's to look after.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        # Runs in the child between fork and exec: only a system call and a pid check.
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(137)  # gbx died before prctl took effect: exec nothing

    return preexec


def _send(process: subprocess.Popen[bytes], signum: int) -> None:
    """Pass a signal on to CMD, unless it has already exited."""
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signum)


def _in_terminal_foreground() -> bool:
    """Whether gbx's process group is the foreground group of the terminal on stdin."""
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (OSError, ValueError, AttributeError):
        return False
