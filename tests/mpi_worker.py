"""What tests/test_mpi.py runs on every rank: `mpiexec -n 2 python tests/mpi_worker.py [options] --
TRAINER FLAGS`. It runs the trainer's CLI (nanoq4.train.main) and can, on one rank only, act after
its n-th optimizer step: send itself a signal, nudge a weight, or raise. --dump DIR makes every
rank save its final weights and batch-norm statistics to DIR/rank<r>.npz."""
import argparse
import os
import signal
import sys

import numpy as np

from nanoq4 import distributed, models, optim
from nanoq4 import train as train_module


def after_step(n, action):
    """Run action(optimizer) right after the n-th optimizer step of this process."""
    real_step = optim.Optimizer.step
    calls = []

    def step(self):
        real_step(self)
        calls.append(1)
        if len(calls) == n:
            action(self)

    optim.Optimizer.step = step


def nudge_first_weight(optimizer):
    optimizer.parameters()[0].data.flat[0] += 1e-3


def fail(optimizer):
    raise RuntimeError("simulated failure of one rank")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, default=1, help="the rank that acts")
    p.add_argument("--after", type=int, default=1, help="... after its n-th optimizer step")
    p.add_argument("--signal", choices=["INT", "TERM"])
    p.add_argument("--nudge", action="store_true", help="add 1e-3 to one weight")
    p.add_argument("--fail", action="store_true", help="raise a RuntimeError")
    p.add_argument("--dump", help="folder for every rank's final weights and batch-norm statistics")
    args, trainer_argv = p.parse_known_args()
    trainer_argv = [a for a in trainer_argv if a != "--"]
    rank = distributed.launch_rank() or 0
    if rank == args.rank:
        if args.signal:
            after_step(args.after, lambda opt: os.kill(os.getpid(), getattr(signal, f"SIG{args.signal}")))
        elif args.nudge:
            after_step(args.after, nudge_first_weight)
        elif args.fail:
            after_step(args.after, fail)
    built = []
    real_build = models.build_model
    models.build_model = lambda *a, **kw: built.append(real_build(*a, **kw)) or built[-1]
    code = train_module.main(trainer_argv)
    if args.dump and built:
        state = built[0].state_dict()
        os.makedirs(args.dump, exist_ok=True)
        np.savez(os.path.join(args.dump, f"rank{rank}.npz"), **state)
    return code


if __name__ == "__main__":
    sys.exit(main())
