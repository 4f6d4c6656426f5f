"""What the command lines (train, evaluate, predict, export_onnx, the data and benchmark scripts)
share: a user error is one line `error: ...` on stderr with exit code 2 (argparse's own refusals
too), and Ctrl-C / SIGTERM end with 130 / 143, i.e. 128 + the signal number, as a shell reports a
process the signal stopped."""
import argparse
import signal
import sys
import threading

from .errors import NanoQ4Error


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM; `signum` picks the exit code."""

    def __init__(self, signum=signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose refusals (unknown flag, `--epochs two`) are one line and exit code 2, like
    every other user error, instead of a usage block."""

    def error(self, message):
        from .distributed import launch_rank  # the ranks of an mpiexec launch parse the same flags: one reports
        self.exit(2, f"error: {message} (see {self.prog} --help)\n" if launch_rank() in (None, 0) else None)


def int_at_least(low):
    """argparse type: an integer >= low, refused with a message naming the domain."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value
    return parse


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def run_command(body, memory_hint="use smaller inputs"):
    """Run a CLI's body() -> exit code. NanoQ4Error: `error: ...` and 2; out of memory: a one-line
    error with `memory_hint`; Ctrl-C: 130; SIGTERM: 143 (it raises Interrupted, so the trainer's
    loop and `finally` blocks still run)."""
    in_main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = signal.signal(signal.SIGTERM, _raise_interrupted) if in_main_thread else None
    try:
        return body()
    except NanoQ4Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"error: out of memory; {memory_hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        return 128 + getattr(e, "signum", signal.SIGINT)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
