"""The trainer's training step on a random batch, for the benchmarks that time it on several
processes: bench_train_step.py (local worker processes) and bench_mpi.py (MPI ranks).

Set up as train.setup sets a run up (model, optimizer with the tanh clip, malloc kept, threads, each
rank's dropout seed, synchronized or per-process batch norm, rank 0's weights, the group's gradient
sum), and the step is train.train_step itself, so a benchmark times what the trainer runs rather than
a copy of it that could drift."""
import time
import types

import numba
import numpy as np

from nanoq4 import distributed, memory, models, nn, parallel, safeguards
from nanoq4 import train as train_module

CLASSES = 10  # CIFAR-10's; the labels of the random batch
WARMUP_STEPS = 2  # Numba compilation or cache load, first touch of the buffers


def median_seconds(fn, repeats, barrier=None):
    """Median wall time of fn() over `repeats` calls, each started after barrier() when given (so
    that every rank starts the timed call together)."""
    times = []
    for _ in range(repeats):
        if barrier:
            barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


class TrainerStep:
    """This rank's part of the trainer's step at the global batch cfg.batch_size: train_step on its
    equal share of a random batch. Calling it runs one step; the seconds each step spent inside the
    group's gradient sum (copy in, the sum, waiting for the slower ranks) go to `sum_seconds`."""

    def __init__(self, cfg, group, keep_freed_memory=True):
        self.group, self.sync_bn = group, cfg.resolved_sync_bn()
        parallel.set_threads(cfg.threads or group.default_threads())
        if keep_freed_memory:
            memory.keep_freed_memory()
        nn.manual_seed(cfg.seed)
        model = models.build_model(cfg.model, CLASSES, quantize=not cfg.fp32, bits=cfg.bits,
                                   per_channel=cfg.per_channel, dropout=cfg.dropout).train()
        nn.set_batch_norm_momentum(model, cfg.bn_momentum)
        if group.size > 1:
            nn.manual_seed(distributed.rank_seed(cfg.seed, group.rank, group.size))
            if self.sync_bn:
                group.sync_batch_norm(model)
        group.broadcast_model(model)
        self.gradient_sum = None if group.size == 1 else group.gradient_sum(
            model.parameters(), [] if self.sync_bn else [b for _, b in model.named_buffers()])

        run = self.run = train_module.Run()
        run.cfg, run.model, run.opt, run.last_good = cfg, model, train_module.make_optimizer(model, cfg), None
        run.loader = types.SimpleNamespace(global_batch_len=lambda k: cfg.batch_size)
        # random labels: only a non-finite loss stops the benchmark, never the divergence rule
        run.watch = safeguards.DivergenceWatch(0, CLASSES, 0.0, 0.0)
        run.gradient_sum = None if self.gradient_sum is None else self._timed_gradient_sum
        self.sum_seconds = []
        rng = np.random.default_rng(group.rank)
        self.x = rng.standard_normal((cfg.batch_size // group.size, 32, 32, 3), dtype=np.float32)
        self.y = rng.integers(0, CLASSES, len(self.x))

    def _timed_gradient_sum(self, *args):
        start = time.perf_counter()
        result = self.gradient_sum(*args)
        self.sum_seconds.append(time.perf_counter() - start)
        return result

    def __call__(self):
        train_module.train_step(self.run, self.x, self.y, 0, 0)

    def barrier(self):
        """Every rank here before the next timed step: a one-number sum, which meets (and fails, should
        a rank be gone) as the group's other collectives do."""
        if self.group.size > 1:
            self.group.sum(np.zeros(1, np.float32))

    def time(self, steps):
        """Warm-up, then `steps` steps each after a barrier -> the median step time in seconds, images/s
        of the global batch, and (several ranks) the median time inside the gradient sum."""
        for _ in range(WARMUP_STEPS):
            self()
        self.sum_seconds.clear()
        step_s = median_seconds(self, steps, self.barrier)
        return dict(step_s=step_s, images_per_s=self.run.cfg.batch_size / step_s,
                    sum_in_step_s=float(np.median(self.sum_seconds)) if self.sum_seconds else None)


def time_on_group(cfg, steps, keep_freed_memory, group):
    """workers.run_on_workers's target: each rank times the trainer's step -> its measurements
    (run_on_workers returns rank 0's) and its thread count."""
    step = TrainerStep(cfg, group, keep_freed_memory)
    return dict(step.time(steps), threads=numba.get_num_threads())
