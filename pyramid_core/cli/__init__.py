"""Command line: `python -m pyramid_core generate|demo|decode|models`.

Bad input ends with one `error: ...` line and exit status 2, before anything is loaded (set
PYRAMID_CORE_TRACEBACK=1 to see the stack instead); Ctrl-C, SIGTERM and SIGHUP end with status 130 and
leave no output file; a finished run prints a summary (time, peak memory, the file written).

The parser (`arguments`) imports no torch: `--help`, `--version` and argument errors are instant. The
rest loads on demand: `request` (the one validation pass), `run` (load, sample, decode, write), `commands`.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import warnings
from typing import Iterator, Sequence, TextIO

from .arguments import build_parser

__all__ = [
    "DEMO_NOTICE", "EXIT_CANCELLED", "EXIT_FAILED", "EXIT_USAGE", "GenerationRequest", "RunSummary", "StepProgress",
    "UsageError", "WriteProgress", "build_parser", "compute_dtype_for", "main", "resolve_request", "run_generation",
]

EXIT_USAGE = 2  # bad input or an OS-level failure: the message names the fix
EXIT_FAILED = 1  # out of device memory, or another rank of a multi-process run failed
EXIT_CANCELLED = 130  # the shell convention for "stopped by Ctrl-C"
TRACEBACK_ENV = "PYRAMID_CORE_TRACEBACK"

_LAZY = {
    "GenerationRequest": "request", "UsageError": "request", "compute_dtype_for": "request", "resolve_request": "request",
    "RunSummary": "run", "StepProgress": "run", "WriteProgress": "run", "DecodeProgress": "run",
    "run_generation": "run", "DEMO_NOTICE": "commands", "DEMO_PROMPT": "commands",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _wants_traceback() -> bool:
    return os.environ.get(TRACEBACK_ENV, "").strip().lower() in ("1", "true", "yes")


@contextlib.contextmanager
def _stop_signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt like Ctrl-C, so every cleanup path runs (main thread only)."""
    names = [name for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]
    if not names or threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {name: signal.signal(getattr(signal, name), interrupt) for name in names}
    try:
        yield
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)


def main(argv: Sequence[str] | None = None, log: TextIO | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad input or OS failure, 1 out of memory,
    130 cancelled)."""
    log = log or sys.stdout
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed its usage message (or --help / --version)
        return int(exc.code or 0)
    with warnings.catch_warnings(), _stop_signals_interrupt():
        warnings.showwarning = _show_warning
        warnings.simplefilter("default")  # each distinct warning once
        if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 speaks for all (errors still print)
            warnings.simplefilter("ignore")
        try:
            _run(args, log)
        except KeyboardInterrupt:
            print("\ncancelled; no file was written", file=sys.stderr)
            return EXIT_CANCELLED
        except Exception as exc:  # noqa: BLE001 - sorted below; the unknown ones re-raise
            if _is_cancel(exc):
                print("\ncancelled; no file was written", file=sys.stderr)
                return EXIT_CANCELLED
            code = _exit_code(exc)
            if code is None or _wants_traceback():
                raise
            print(f"error: {_one_line(exc)}", file=sys.stderr)
            return code
    return 0


def _run(args, log: TextIO) -> None:
    from . import commands

    handlers = {"generate": commands.generate_command, "demo": commands.demo_command,
                "decode": commands.decode_command, "models": commands.models_command}
    handlers[args.command](args, log)


def _exit_code(exc: BaseException) -> int | None:
    """The exit status of an expected failure; None for a bug (shown with its traceback)."""
    if _is_out_of_memory(exc) or _is_peer_failure(exc):
        return EXIT_FAILED
    from .run import KeptLatentsError

    if isinstance(exc, (ValueError, OSError, ImportError, KeptLatentsError)):
        return EXIT_USAGE
    return None


def _is_cancel(exc: BaseException) -> bool:
    sampling = sys.modules.get("pyramid_core.sampling")
    return sampling is not None and isinstance(exc, sampling.GenerationCancelled)


def _is_peer_failure(exc: BaseException) -> bool:
    comm = sys.modules.get("pyramid_core.parallel.comm")
    return comm is not None and isinstance(exc, comm.PeerFailure)


def _is_out_of_memory(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError)


def _one_line(exc: BaseException) -> str:
    if _is_out_of_memory(exc):
        text = str(exc)
        hint = text if "offload" in text else "try --offload auto (or model), a smaller size or a shorter --temp"
        return f"out of GPU memory; {hint}"
    return " ".join(str(exc).split()) or type(exc).__name__


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)
