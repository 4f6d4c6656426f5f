"""Is data parallelism over MPI worth it on one machine, and what does a step's Allreduce cost?

    python benchmarks/bench_mpi.py [--batch 256] [--steps 5] [--ranks 2] [--sync-bn]

Times the trainer's VGG4bit step (fake quantization, forward, backward, SGD + Nesterov, tanh
clip) at the global batch --batch in two configurations on this machine's C cores: one process
with C threads, and --ranks MPI ranks (mpiexec) with C/ranks threads each, every rank on its
share of the batch plus the step's one Allreduce of the flat float32 gradient buffer
(distributed.GradientSum). Prints the median step time and images/s of each, the time inside the
gradient sum per step (copy in, Allreduce, waiting for the slower rank), and the Allreduce of the
13 MB buffer alone: in place with the buffer method (what the trainer does) and with mpi4py's
pickling lowercase allreduce, for comparison. Needs the mpi extra (pip install ".[mpi]").

    python benchmarks/bench_mpi.py --scaling-table [STEP_S]

prints README's scaling estimate ("Training on several machines") for a one-node step time STEP_S
at the global batch (without it, those cells read TODO-MEASURE): a ring Allreduce moves
2(N-1)/N x the buffer in and out of each of N nodes, so a step takes STEP_S/N + that / bandwidth.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from nanoq4 import cli, distributed, models, safeguards
from nanoq4 import train as train_module
from trainer_step import TrainerStep, median_seconds  # this folder's: the trainer's step, set up as train.setup does

RESULT = "RESULT "  # the line a worker's rank 0 prints its measurements on


def worker(batch, steps, threads, sync_bn):
    """One configuration: this process (or each rank under mpiexec) times the trainer's step on
    its share of a random batch of `batch` images; rank 0 prints the RESULT line."""
    group = distributed.world()
    step = TrainerStep(train_module.TrainConfig(batch_size=batch, sync_bn=sync_bn, threads=threads), group)
    result = dict(ranks=group.size, threads=threads, batch=batch, **step.time(steps))
    if step.gradient_sum is not None:
        comm, mpi = group.comm, group.mpi
        flat = step.gradient_sum.flat
        result.update(
            buffer_mb=flat.nbytes / 1e6,
            allreduce_s=median_seconds(lambda: comm.Allreduce(mpi.IN_PLACE, flat, op=mpi.SUM), 20, step.barrier),
            pickled_allreduce_s=median_seconds(lambda: comm.allreduce(flat, op=mpi.SUM), 5, step.barrier))
    if group.is_root:
        print(RESULT + json.dumps(result), flush=True)


NODES = (2, 4, 8, 16, 32, 64)
LINKS_GBIT = (10, 25)


def gradient_buffer_bytes():
    """Bytes of VGG4bit's flat gradient buffer: every parameter, the running statistics, loss and count."""
    model = models.build_model("vgg4bit", 10)
    return 4 * (model.num_parameters() + sum(b.size for _, b in model.named_buffers()) + 2)


def scaling_table(step_s, batch):
    """Markdown rows: per node count N, the bytes a ring Allreduce moves per node and step, its time
    on each link, and with a one-node step time the step time T(N) = step_s/N + Allreduce and the
    images/s (batch / T(N)); step_s None leaves those cells TODO-MEASURE."""
    size = gradient_buffer_bytes()
    head = ["nodes N", "MB sent per node"]
    for g in LINKS_GBIT:
        head += [f"Allreduce {g} Gbit/s", f"step {g} Gbit/s", f"images/s {g} Gbit/s (speed-up)"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in NODES:
        moved = 2 * (n - 1) / n * size
        cells = [str(n), f"{moved / 1e6:.1f}"]
        for g in LINKS_GBIT:
            allreduce_s = moved / (g * 1e9 / 8)
            cells.append(f"{allreduce_s * 1e3:.1f} ms")
            if step_s is None:
                cells += ["TODO-MEASURE", "TODO-MEASURE"]
            else:
                step = step_s / n + allreduce_s
                cells += [f"{step:.3f} s", f"{batch / step:,.0f} ({step_s / step:.1f}x)"]
        rows.append("| " + " | ".join(cells) + " |")
    return f"buffer {size / 1e6:.2f} MB, global batch {batch}\n" + "\n".join(rows)


def measure(command, env):
    """Run one configuration -> its RESULT dict."""
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        sys.exit(f"error: {' '.join(command)} failed (exit {done.returncode}):\n{done.stderr.strip()}")
    return json.loads(lines[0][len(RESULT):])


def main():
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=cli.int_at_least(2), default=train_module.TrainConfig().batch_size,
                   help="global batch in images (default the trainer's, 256)")
    p.add_argument("--steps", type=cli.int_at_least(1), default=5, help="timed steps after 2 warm-up steps (default 5)")
    p.add_argument("--ranks", type=cli.int_at_least(2), default=2, help="MPI ranks (default 2)")
    p.add_argument("--sync-bn", action="store_true", help="synchronized batch norm on the ranks")
    p.add_argument("--scaling-table", nargs="?", type=float, const=0.0, metavar="STEP_S",
                   help="print README's scaling estimate for this one-node step time in seconds (none: TODO-MEASURE)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=cli.int_at_least(1), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.scaling_table is not None:
        return print(scaling_table(args.scaling_table or None, args.batch))
    if args.worker:
        return worker(args.batch, args.steps, args.threads, args.sync_bn)

    if args.batch % args.ranks:
        p.error(f"--batch {args.batch} does not split evenly across {args.ranks} ranks")
    cores = safeguards.available_cores()
    mpiexec = Path(sys.executable).with_name("mpiexec")
    mpiexec = str(mpiexec) if mpiexec.is_file() else "mpiexec"
    env = {k: v for k, v in os.environ.items() if k not in distributed.LAUNCH_VARIABLES}
    this = [sys.executable, str(Path(__file__).resolve()), "--worker", "--batch", str(args.batch),
            "--steps", str(args.steps)] + (["--sync-bn"] if args.sync_bn else [])
    per_rank = max(1, cores // args.ranks)
    print(f"VGG4bit training step at global batch {args.batch}, median of {args.steps} steps, {cores} cores")
    one = measure(this + ["--threads", str(cores)], env)
    many = measure([mpiexec, "-n", str(args.ranks)] + this + ["--threads", str(per_rank)], env)
    print(f"{'configuration':<28}{'step s':>9}{'images/s':>10}{'gradient sum ms':>17}")
    print(f"{f'1 process x {cores} threads':<28}{one['step_s']:>9.3f}{one['images_per_s']:>10.0f}{'-':>17}")
    name = f"{args.ranks} ranks x {per_rank} thread(s)" + (" sync-BN" if args.sync_bn else "")
    print(f"{name:<28}{many['step_s']:>9.3f}{many['images_per_s']:>10.0f}{many['sum_in_step_s'] * 1e3:>17.1f}")
    print(f"{args.ranks} ranks / 1 process: {many['images_per_s'] / one['images_per_s']:.2f}x the images/s")
    print(f"gradient buffer {many['buffer_mb']:.1f} MB: in-place Allreduce (buffer method) "
          f"{many['allreduce_s'] * 1e3:.1f} ms, pickled lowercase allreduce {many['pickled_allreduce_s'] * 1e3:.1f} ms "
          f"(median of 20 and 5 after a barrier)")


if __name__ == "__main__":
    main()
