"""Data-parallel worker processes on one machine: `python -m nanoq4.train` at a batch of 128 or more
trains on N processes (--workers N; by default one per core while each gets 64 images or more), each
on an equal share of every batch, as `mpiexec -n N` does (distributed.py), without MPI.

Why processes: on 2 cores, two single-threaded processes that each run the whole step on half of the
batch trained 1.3x faster than one process with 2 threads (benchmarks/bench_mpi.py): they overlap
memory-bound and compute-bound phases and never meet at a layer's thread barriers, only once per step
to sum the gradients (and with synchronized batch norm twice per batch-norm layer).

The calling process is rank 0. It starts ranks 1..N-1 with multiprocessing's spawn (never fork: the
threads of Numba and OpenMP do not survive a fork); each runs train() with its LocalGroup and the same
settings. Arrays cross through shared memory: each rank writes its array into its own slot, all meet
at a barrier, and every rank adds the slots up in rank order 0..N-1, so every rank gets the same bits,
run after run. Two sets of slots taken in turn spare a second barrier: a rank writes into a set again
only two collectives later, after a barrier that every rank reached once done reading it. Python
objects (on_root's outcome, the checkpoint rank 0 read, the dropout streams gathered at checkpoints)
go through a pipe between rank 0 and each worker.

Failures end the run, never hang it: rank 0 watches the workers' processes, and when one ends before
the run does it breaks the barrier, so rank 0 raises a one-line NanoQ4Error naming the worker (which
printed its own error before it exited); a worker exits when rank 0 is gone. A NanoQ4Error or a stop
that every rank raises at the same point is reported once, by rank 0. Ctrl-C reaches every process of
the terminal's process group, and rank 0 passes a SIGTERM on to the workers (during training only
rank 0's own stop request is needed: stop_signal tells every rank), so all stop at the same batch.
"""
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from multiprocessing import connection, shared_memory

import numba
import numpy as np

from . import cli, distributed, parallel
from .errors import NanoQ4Error
from .safeguards import available_cores

FIRST_SLOT_BYTES = 1 << 16   # each rank's slot; grown (by a collective) when an array does not fit
SLOT_ALIGN = 64              # bytes: slots start on cache lines
JOIN_WAIT_S = 60.0           # how long rank 0 waits for the workers to exit after the run, before killing them
PARENT_POLL_S = 0.5          # how often a worker looks whether rank 0 is still there
RECORD_WAIT_S = 5.0          # how long rank 0 waits to learn which worker ended (its pipe may close first)
GROUP_ENDED = 3              # a worker's exit code when rank 0 broke the group (another worker failed)


class GroupEnded(Exception):
    """Raised on a worker when rank 0 broke the group or is gone: the worker has nothing to add."""


class LocalGroup(distributed.Group):
    """The ranks of one run on this machine: rank 0 (the process that called train) and the worker
    processes it started. The same interface as distributed.MPIGroup (see distributed.Group)."""

    member = "worker"

    def __init__(self, rank, size, barrier, exit_barrier, pipes, slots_name, slot_bytes):
        self.rank, self.size, self.is_root = rank, size, rank == 0
        self.workers = size  # the processes that train together on this machine
        self.barrier = barrier            # where every collective on arrays meets
        self.exit_barrier = exit_barrier  # where ranks ending with a shared error meet
        self.pipes = pipes                # rank 0: {rank: pipe end}; a worker: {0: pipe end}
        self.processes, self.ended = {}, {}  # rank 0: {rank: Process}, {rank: exit code} of those that ended
        self.slots = shared_memory.SharedMemory(slots_name, create=rank == 0, size=2 * size * slot_bytes)
        self.slot_bytes, self.turn = slot_bytes, 0

    # ------------------------------------------------------------------ starting and ending (rank 0)

    @classmethod
    def start(cls, size, target, args):
        """Rank 0 of `size` processes: start workers 1..size-1, each calling target(*args, group)."""
        context = multiprocessing.get_context("spawn")
        pipes = {r: context.Pipe() for r in range(1, size)}
        group = cls(0, size, context.Barrier(size), context.Barrier(size), {r: ends[0] for r, ends in pipes.items()},
                    None, FIRST_SLOT_BYTES)
        try:
            for r, (_, theirs) in pipes.items():
                process = context.Process(target=_worker_main, name=f"nanoq4-worker-{r}", daemon=True,
                                          args=(r, size, group.barrier, group.exit_barrier, theirs, group.slots.name,
                                                FIRST_SLOT_BYTES, target, args))
                process.start()
                theirs.close()  # only the worker holds its end now: its exit closes the pipe
                group.processes[r] = process
        except BaseException:
            group.close(wait=False)
            raise
        threading.Thread(target=group._watch_workers, name="nanoq4-watch-workers", daemon=True).start()
        return group

    def _watch_workers(self):
        """Rank 0's watch: record each worker that ends; one that ends before the run breaks the barrier
        (and, unless it exited cleanly after a shared error, the meeting at the end)."""
        running = dict(self.processes)
        while running:
            ready = connection.wait([p.sentinel for p in running.values()])
            for rank, process in list(running.items()):
                if process.sentinel in ready:
                    process.join()
                    del running[rank]
                    self.ended[rank] = process.exitcode
                    self.barrier.abort()
                    if process.exitcode != 0:
                        self.exit_barrier.abort()

    def _failure(self):
        """Rank 0: the NanoQ4Error naming the worker whose end broke the group."""
        deadline = time.monotonic() + RECORD_WAIT_S
        while not self.ended and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self.ended:
            return NanoQ4Error("a worker process stopped answering; the run stopped")
        rank, code = next(iter(self.ended.items()))
        how = (f"was killed by {signal.Signals(-code).name}" if code < 0 else
               f"exited with code {code}" if code else "ended before the run did")
        return NanoQ4Error(f"worker {rank} of {self.size} (process {self.processes[rank].pid}) {how}; the run "
                           f"stopped (the worker's own error, if any, is printed above)")

    def close(self, wait):
        """Rank 0, at the end: wait (when `wait`, up to JOIN_WAIT_S) for the workers to exit, kill any
        still running, free the shared memory."""
        deadline = time.monotonic() + (JOIN_WAIT_S if wait else 0)
        try:
            for process in self.processes.values():
                process.join(max(0.0, deadline - time.monotonic()))
        finally:
            for process in self.processes.values():
                if process.is_alive():
                    process.kill()
                    process.join()
            for pipe in self.pipes.values():
                pipe.close()
            self._release(self.slots)

    def _release(self, slots):
        slots.close()
        if self.is_root:
            slots.unlink()

    def forward_sigterm(self):
        """While the group runs, a SIGTERM to rank 0 goes to every worker too, so that all stop
        (during training only rank 0's stop request counts: stop_signal tells every rank)."""
        previous = signal.getsignal(signal.SIGTERM)

        def forward(signum, frame):
            for process in self.processes.values():
                if process.is_alive():
                    os.kill(process.pid, signum)
            if callable(previous):
                return previous(signum, frame)
            if previous != signal.SIG_IGN:  # the default would end rank 0 before it ends the workers
                raise cli.Interrupted(signum)

        signal.signal(signal.SIGTERM, forward)
        return signal.SIG_DFL if previous is None else previous

    # ------------------------------------------------------------------ the end of a run

    def run_together(self, body, memory_hint="lower --batch-size"):
        """body() on this rank. Rank 0 returns its result or raises; the workers' errors that rank 0
        raised too (a NanoQ4Error or a stop at the same point) are reported by rank 0 alone. A worker
        returns its exit code: 0 after the run or a shared error, else with its error printed."""
        if self.is_root:
            return self._run_root(body)
        try:
            body()
            return 0
        except GroupEnded:
            return GROUP_ENDED
        except NanoQ4Error as e:
            if self._all_arrive():
                return 0
            print(f"error: {e} (worker {self.rank} of {self.size})", file=sys.stderr, flush=True)
            return 2
        except (KeyboardInterrupt, SystemExit) as e:
            if self._all_arrive():
                return 0
            print(f"{type(e).__name__} on worker {self.rank} of {self.size} alone", file=sys.stderr, flush=True)
            return 128 + getattr(e, "signum", signal.SIGINT) if isinstance(e, KeyboardInterrupt) else 1
        except MemoryError:
            print(f"error: out of memory on worker {self.rank} of {self.size}; {memory_hint}", file=sys.stderr,
                  flush=True)
            return 2
        except BaseException:
            print(f"worker {self.rank} of {self.size} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            return 1

    def _run_root(self, body):
        in_main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
        previous = self.forward_sigterm() if in_main_thread else None
        shared = False
        try:
            result = body()
            shared = True
            return result
        except (NanoQ4Error, KeyboardInterrupt, SystemExit):
            shared = self._all_arrive()  # the workers that raised the same learn that rank 0 reports it
            raise
        finally:
            if in_main_thread:
                signal.signal(signal.SIGTERM, previous)
            self.close(wait=shared)

    def _all_arrive(self):
        try:
            self.exit_barrier.wait(timeout=distributed.SHARED_EXIT_WAIT_S)
            return True
        except threading.BrokenBarrierError:
            return False

    # ------------------------------------------------------------------ the collectives

    def default_threads(self):
        """Each worker's share of the cores, the same on every worker."""
        return max(1, available_cores() // self.size)

    def sum(self, values):
        """Elementwise sum over the workers, in place, added in rank order: the same bits on every worker."""
        slots = self._exchange(values)
        np.copyto(values, slots[0])
        for slot in slots[1:]:
            values += slot
        return values

    def max(self, values):
        slots = self._exchange(values)
        np.copyto(values, slots[0])
        for slot in slots[1:]:
            np.maximum(values, slot, out=values)
        return values

    def allgather(self, values):
        return np.stack(self._exchange(values))

    def broadcast_model(self, model):
        """Every parameter and buffer (BatchNorm running statistics) from rank 0, in place."""
        for array in [p.data for _, p in model.named_parameters()] + [b for _, b in model.named_buffers()]:
            np.copyto(array, self._exchange(array)[0])

    def broadcast_object(self, value):
        if self.is_root:
            for rank in self.pipes:
                self._send(rank, value)
            return value
        return self._receive(0)

    def gather(self, value):
        """[value of rank 0, rank 1, ...] on rank 0, None elsewhere (pickled: checkpoints only)."""
        if self.is_root:
            return [value] + [self._receive(rank) for rank in self.pipes]
        self._send(0, value)
        return None

    def allgather_objects(self, value):
        return self.broadcast_object(self.gather(value))

    def turns(self):
        """in_turns: rank 0 (which may download the data), then the workers."""
        return self.is_root, not self.is_root

    def _exchange(self, values):
        """Every rank's `values` (the same shape and dtype on all) -> [rank 0's, rank 1's, ...] as
        views into the shared slots, valid until the next collective but one."""
        if values.nbytes > self.slot_bytes:
            self._grow(values.nbytes)
        self.turn ^= 1
        self._slot(self.rank, values)[...] = values
        self._meet()
        return [self._slot(rank, values) for rank in range(self.size)]

    def _slot(self, rank, like):
        offset = (self.turn * self.size + rank) * self.slot_bytes
        return np.ndarray(like.shape, like.dtype, buffer=self.slots.buf, offset=offset)

    def _grow(self, nbytes):
        """Larger slots, on every rank at the same collective: rank 0 makes them, the workers attach."""
        old = self.slots
        if self.is_root:
            slot_bytes = -(-max(nbytes, 2 * self.slot_bytes) // SLOT_ALIGN) * SLOT_ALIGN
            self.slots = shared_memory.SharedMemory(create=True, size=2 * self.size * slot_bytes)
            self.broadcast_object((self.slots.name, slot_bytes))
        else:
            name, slot_bytes = self.broadcast_object(None)
            self.slots = shared_memory.SharedMemory(name)
        self.slot_bytes = slot_bytes
        self._release(old)

    def _meet(self):
        try:
            self.barrier.wait()
        except threading.BrokenBarrierError:
            raise self._failure() if self.is_root else GroupEnded() from None

    def _send(self, rank, value):
        try:
            self.pipes[rank].send(value)
        except OSError:
            raise self._failure() if self.is_root else GroupEnded() from None

    def _receive(self, rank):
        try:
            return self.pipes[rank].recv()
        except (EOFError, OSError):
            raise self._failure() if self.is_root else GroupEnded() from None


def run_on_workers(size, target, *args):
    """target(*args, group) on `size` processes of this machine: here as rank 0, and on size-1 worker
    processes started for it -> rank 0's result (or its error). `target` must be importable by name
    (spawn pickles it so): train.train, whose arguments are (cfg, given). Every worker has ended when
    this returns. The caller's thread count (which rank 0 lowers to its share of the cores) is
    restored afterwards, so a library caller's later work runs on all its threads again."""
    threads = numba.get_num_threads()
    group = LocalGroup.start(size, target, args)
    try:
        return group.run_together(lambda: target(*args, group))
    finally:
        parallel.set_threads(threads)


def _exit_without_rank_0(parent):
    """A worker's watch: exit at once when rank 0 (this process's parent) is gone."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(GROUP_ENDED)


def _worker_main(rank, size, barrier, exit_barrier, pipe, slots_name, slot_bytes, target, args):
    """What a worker process runs (spawn's target): target(*args, group) as rank `rank`."""
    threading.Thread(target=_exit_without_rank_0, args=(os.getppid(),), name="nanoq4-watch-rank-0",
                     daemon=True).start()
    group = LocalGroup(rank, size, barrier, exit_barrier, {0: pipe}, slots_name, slot_bytes)
    sys.exit(cli.run_command(lambda: group.run_together(lambda: target(*args, group))))
