"""Data-parallel training over MPI: `mpiexec -n N python -m nanoq4.train ...` trains one model on N
processes (ranks), on one machine or many, as Horovod and PyTorch DDP do, with the same flags.

Every rank holds the whole model. Rank 0 initializes it (or reads the checkpoint) and broadcasts it.
Each step every rank runs forward and backward on its shard of the global batch and backpropagates
its share n_r/n of the global batch's mean loss; then ONE in-place Allreduce sums a flat float32
buffer that holds every gradient (with local batch norm also the running statistics, share-weighted)
and the step's loss and correct count. The sum is the gradient of the global batch, so every rank
applies the identical optimizer step, tanh clip and quantization, and the weights stay bit-identical
(checked every epoch). `--sync-bn` sums the batch-norm statistics over the ranks too (forward and
backward), and then N ranks compute what one process computes at the same global batch.

Errors: a user error stays one line and no rank is left waiting forever. Every NanoQ4Error is raised
on all ranks at the same point: rank-0-only work (the run folder, reading the checkpoint, writing
files) goes through `on_root`, which hands its outcome to every rank, and every decision of the loop
is made on reduced values. Rank 0 alone prints it. Anything else that escapes a rank (a bug, out of
memory) is printed by that rank, which then ends the whole job (MPI_Abort).

mpi4py is imported only when mpiexec started the process; one process never needs it (install
MPI with `pip install "nanoq4[mpi]"`: mpi4py and the MPICH wheel).
"""
import os
import sys
import time
import traceback
import zlib

import numpy as np

from . import cli, nn
from .errors import NanoQ4Error
from .safeguards import available_cores

# What MPI launchers put in each rank's environment: MPICH/Intel MPI (Hydra), Open MPI, PMIx.
RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
LAUNCH_VARIABLES = RANK_VARIABLES + ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALRANKID")
INSTALL_HINT = 'pip install "nanoq4[mpi]"'
# A NanoQ4Error or a stop is raised by every rank at the same point; a rank that still waits for
# the others after this long raised it alone, and ends the job instead.
SHARED_EXIT_WAIT_S = 60.0


def launched_by_mpiexec():
    """True when an MPI launcher (mpiexec, mpirun, srun --mpi) started this process."""
    return any(name in os.environ for name in LAUNCH_VARIABLES)


def launch_rank():
    """This process's rank as the launcher's environment states it (None without a launcher),
    readable before MPI starts: what decides who reports an error that comes before MPI."""
    for name in RANK_VARIABLES:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return None


_world = None


def world():
    """The group of this process: SingleProcess without an MPI launcher (mpi4py is then never
    imported), else an MPIGroup over all ranks. Under a launcher without mpi4py: a NanoQ4Error."""
    global _world
    if _world is None:
        _world = _connect() if launched_by_mpiexec() else SingleProcess()
    return _world


def _connect():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        raise NanoQ4Error(f"started by mpiexec, but mpi4py is not installed; install the MPI extra: "
                          f"{INSTALL_HINT}") from None
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError) as e:
        raise NanoQ4Error(f"mpi4py cannot load an MPI library ({e}); {INSTALL_HINT} installs "
                          f"MPICH with it") from None
    comm = MPI.COMM_WORLD
    return SingleProcess() if comm.Get_size() == 1 else MPIGroup(comm, MPI)


def run_command(body, memory_hint="use smaller inputs"):
    """cli.run_command for a command that may run on several ranks: without a launcher exactly
    cli.run_command; on several ranks, a NanoQ4Error or a stop (raised on every rank) is
    reported once, by rank 0, and anything a rank raises alone ends the job with its error."""
    if not launched_by_mpiexec():
        return cli.run_command(body, memory_hint)
    try:
        group = world()
    except NanoQ4Error as e:  # every rank fails the same way; one of them says so
        if launch_rank() in (None, 0):
            print(f"error: {e}", file=sys.stderr)
        return 2
    if group.size == 1:
        return cli.run_command(body, memory_hint)
    return cli.run_command(lambda: group.run_together(body, memory_hint), memory_hint)


def check_batch_split(batch_size, ranks, sync_bn):
    """Refuse a global batch that does not split evenly across the ranks (or leaves a rank's
    batch norm a single image), as one line naming --batch-size."""
    if ranks == 1:
        return
    if batch_size % ranks:
        lower = batch_size - batch_size % ranks
        raise NanoQ4Error(f"--batch-size {batch_size} (the global batch) does not split evenly across {ranks} "
                          f"ranks; choose a multiple of {ranks}, e.g. {lower or ranks} or {lower + ranks}")
    if batch_size // ranks < 2 and not sync_bn:
        raise NanoQ4Error(f"--batch-size {batch_size} leaves each of the {ranks} ranks 1 image per step and its "
                          f"batch norm needs 2; use --batch-size {2 * ranks} or more, or --sync-bn")


def rank_seed(seed, rank, ranks):
    """The seed of a rank's own random stream (dropout): distinct per rank, and distinct from
    the (seed, epoch) streams of the data order."""
    return np.random.SeedSequence(seed).spawn(ranks)[rank]


def state_checksum(arrays):
    """CRC-32 over the bytes of arrays (nested in lists, tuples and dicts; other values skipped)."""
    crc = 0
    stack = [arrays]
    while stack:
        item = stack.pop()
        if isinstance(item, np.ndarray):
            crc = zlib.crc32(np.ascontiguousarray(item).view(np.uint8), crc)
        elif isinstance(item, dict):
            stack.extend(reversed(list(item.values())))
        elif isinstance(item, (list, tuple)):
            stack.extend(reversed(item))
    return crc


class SingleProcess:
    """The group of a run without MPI: rank 0 of 1, where every collective is the identity."""

    rank, size, is_root = 0, 1, True
    workers = 1  # processes training together on this machine that nanoq4 started (workers.py)

    def on_root(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)

    def in_turns(self, fn):
        return fn()

    def default_threads(self):
        return None  # all cores, as set up

    def broadcast_model(self, model):
        pass

    def stop_signal(self, stop):
        return stop.signum if stop.requested else None

    def check_same(self, arrays, when, hint):
        pass

    def average(self, arrays):
        pass


class Group:
    """What every group of several processes offers the trainer, built on the collectives each
    group provides: on arrays of the same shape and dtype on every process `sum` and `max`
    (elementwise, in place, the same bits on every process) and `allgather` (-> one row per
    process); on pickled objects `broadcast_object` (rank 0's) and `allgather_objects`; and
    `turns()`, the order of in_turns. MPIGroup runs them as MPI collectives, workers.LocalGroup
    through shared memory and pipes."""

    member = "rank"  # what the messages call one process of the group

    def on_root(self, fn, *args, **kwargs):
        """fn(...) on rank 0 only; its result, or its NanoQ4Error, on every process."""
        outcome = None
        if self.is_root:
            try:
                outcome = ("ok", fn(*args, **kwargs))
            except NanoQ4Error as e:
                outcome = ("error", str(e))
        kind, value = self.broadcast_object(outcome)
        if kind == "error":
            raise NanoQ4Error(value)
        return value

    def in_turns(self, fn):
        """fn() on every process, in the group's turns (first on rank 0). A NanoQ4Error on any
        process is raised on every process (the first one, naming its process)."""
        result = None
        for mine in self.turns():
            error = None
            if mine:
                try:
                    result = fn()
                except NanoQ4Error as e:
                    error = str(e) if self.is_root else f"{self.member} {self.rank}: {e}"
            failed = [e for e in self.allgather_objects(error) if e]
            if failed:
                raise NanoQ4Error(failed[0])
        return result

    def stop_signal(self, stop):
        """The signal (Ctrl-C, SIGTERM) that any process received, or None: all stop at the same
        batch boundary. One int, cheap beside the gradients."""
        flag = np.array([stop.signum if stop.requested else 0], dtype=np.int32)
        return int(self.max(flag)[0]) or None

    def gradient_sum(self, params, buffers):
        return GradientSum(params, buffers, self.sum)

    def sum_statistics(self, sums, count):
        """Per-channel sums (float64) and the value count summed over the processes: synchronized
        batch norm (nn's BatchNorm `sync`)."""
        flat = np.empty(sums.size + 1, dtype=np.float64)
        flat[:-1] = sums.ravel()
        flat[-1] = count
        self.sum(flat)
        return flat[:-1].reshape(sums.shape), int(flat[-1])

    def sync_batch_norm(self, model):
        """Make every batch-norm layer of `model` use the statistics of the global batch."""
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                module.sync = self.sum_statistics

    def average(self, arrays):
        """Each array replaced in place by its mean over the processes (re-estimated per-process
        batch-norm statistics), summed in float64 by one collective."""
        flat = np.concatenate([a.ravel() for a in arrays]).astype(np.float64)
        self.sum(flat)
        flat /= self.size
        start = 0
        for a in arrays:
            a[...] = flat[start:start + a.size].reshape(a.shape)
            start += a.size

    def check_same(self, arrays, when, hint):
        """Stop the run (on every process) when the processes' weights and optimizer states are not
        bit-identical: a cheap checksum, compared across them."""
        every = self.allgather(np.array([state_checksum(arrays)], dtype=np.int64))[:, 0]
        if np.any(every != every[0]):
            differ = [r for r in range(self.size) if every[r] != every[0]]
            raise NanoQ4Error(f"the {self.member}s diverged {when}: the weights or optimizer state of "
                              f"{self.member}(s) {', '.join(map(str, differ))} differ from {self.member} 0's "
                              f"(checksums {every[0]:08x} vs {every[differ[0]]:08x}); {hint}")


class MPIGroup(Group):
    """All ranks of an mpiexec launch (MPI.COMM_WORLD). Collectives on buffers use mpi4py's
    uppercase methods (no pickling); pickled objects cross only at setup and at checkpoints."""

    workers = 1  # nanoq4 starts no local worker processes under mpiexec: it started the ranks

    def __init__(self, comm, mpi):
        self.comm, self.mpi = comm, mpi
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.is_root = self.rank == 0
        self.machine = comm.Split_type(mpi.COMM_TYPE_SHARED)  # the ranks sharing this machine
        self.exit_comm = comm.Dup()  # only for the meeting of ranks that end with a shared error

    # ------------------------------------------------------------------ setup and checkpoints

    def broadcast_object(self, value):
        return self.comm.bcast(value, root=0)

    def allgather_objects(self, value):
        return self.comm.allgather(value)

    def turns(self):
        """in_turns: rank 0, then the first rank of each other machine, then the rest, so a download
        into a folder that several ranks share happens once."""
        first_here = self.machine.Get_rank() == 0
        return self.is_root, first_here and not self.is_root, not first_here

    def default_threads(self):
        """Each rank's share of its machine's cores (all of a rank's cores when the launcher bound
        it to some), the same on every rank: the smallest share, since each step waits for the
        slowest rank anyway, and equal thread counts keep BLAS reductions (the gradient norm)
        bit-identical across ranks."""
        cores = available_cores()
        share = cores if cores < (os.cpu_count() or cores) else max(1, cores // self.machine.Get_size())
        return self.comm.allreduce(share, op=self.mpi.MIN)

    def broadcast_model(self, model):
        """Every parameter and buffer (BatchNorm running statistics) from rank 0, in place."""
        for _, p in model.named_parameters():
            self.comm.Bcast(p.data, root=0)
        for _, b in model.named_buffers():
            self.comm.Bcast(b, root=0)

    def gather(self, value):
        """[value of rank 0, rank 1, ...] on rank 0, None elsewhere (pickled: checkpoints only)."""
        return self.comm.gather(value, root=0)

    # ------------------------------------------------------------------ the collectives of Group

    def sum(self, values):
        """Elementwise sum over the ranks, in place (gradients, statistics, evaluation totals)."""
        self.comm.Allreduce(self.mpi.IN_PLACE, values, op=self.mpi.SUM)
        return values

    def max(self, values):
        self.comm.Allreduce(self.mpi.IN_PLACE, values, op=self.mpi.MAX)
        return values

    def allgather(self, values):
        every = np.empty((self.size,) + values.shape, dtype=values.dtype)
        self.comm.Allgather(values, every)
        return every

    # ------------------------------------------------------------------ the end of a run

    def run_together(self, body, memory_hint):
        """body() on this rank. A NanoQ4Error, a stop or argparse's exit comes on every rank at the
        same point: the ranks meet, rank 0 reports it once, all exit with its code. Anything else
        (or one of those that another rank did not raise) is printed by this rank, which ends the job."""
        try:
            return body()
        except NanoQ4Error as e:
            if not self._all_arrive():
                self._abort(2, f"error: {e} (rank {self.rank} of {self.size})")
            if self.is_root:
                raise
            return 2
        except (KeyboardInterrupt, SystemExit) as e:  # a stop, or argparse's exit (--help, a bad flag)
            if not self._all_arrive():
                code = 128 + getattr(e, "signum", 2) if isinstance(e, KeyboardInterrupt) else e.code
                self._abort(code if isinstance(code, int) else 1, f"{type(e).__name__} on rank {self.rank} "
                            f"of {self.size} alone")
            raise
        except MemoryError:
            self._abort(2, f"error: out of memory on rank {self.rank} of {self.size}; {memory_hint}")
        except BaseException:
            self._abort(1, f"rank {self.rank} of {self.size} failed:\n{traceback.format_exc()}")

    def _all_arrive(self):
        request = self.exit_comm.Ibarrier()
        deadline = time.monotonic() + SHARED_EXIT_WAIT_S
        while not request.Test():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def _abort(self, code, message):
        sys.stdout.flush()
        print(message, file=sys.stderr, flush=True)
        self.comm.Abort(code)


class GradientSum:
    """The one sum over the processes of a training step, on a flat float32 buffer allocated once:
    every parameter's gradient, then (per-process batch norm) the running statistics times this
    process's share, then the share-weighted loss and the correct count. Each process backpropagated
    its share of the global batch's mean loss, so the sum is the global batch's gradient; afterwards
    each parameter's .grad is a view into the buffer, and the buffers hold the weighted mean.
    `sum_in_place(flat)`: the group's sum (an MPI Allreduce, or workers.LocalGroup's)."""

    def __init__(self, params, buffers, sum_in_place):
        self.sum_in_place = sum_in_place
        self.params, self.buffers = list(params), list(buffers)
        sizes = [p.size for p in self.params] + [b.size for b in self.buffers]
        self.flat = np.empty(sum(sizes) + 2, dtype=np.float32)
        ends = np.cumsum(sizes)
        views = [self.flat[end - size:end] for size, end in zip(sizes, ends)]
        self.param_views, self.buffer_views = views[:len(self.params)], views[len(self.params):]

    def __call__(self, loss, correct, share):
        """(this process's mean loss, correct count, share n_r/n) -> (global mean loss, correct count)."""
        for p, view in zip(self.params, self.param_views):
            if p.grad is None:
                view.fill(0)
            else:
                view[:] = p.grad.reshape(-1)
        for b, view in zip(self.buffers, self.buffer_views):
            np.multiply(b.reshape(-1), share, out=view)
        self.flat[-2:] = (loss * share, correct)
        self.sum_in_place(self.flat)
        for p, view in zip(self.params, self.param_views):
            if p.grad is not None:
                p.grad = view.reshape(p.shape)
        for b, view in zip(self.buffers, self.buffer_views):
            b[...] = view.reshape(b.shape)
        return float(self.flat[-2]), int(round(float(self.flat[-1])))
