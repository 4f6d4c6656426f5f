"""Local worker processes (nanoq4/workers.py): the collectives of a LocalGroup against plain
expectations; 2 workers against one process and against each other; a stop by SIGTERM to rank 0 and
the exact resume; a worker or rank 0 killed; the refusals of --workers values; the default count.

The runs are test_mpi's (2 epochs of 2 steps of 32 images, 16 per worker): a few seconds each."""
import contextlib
import dataclasses
import io
import multiprocessing.process
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nanoq4 import data, export, models, safeguards, workers
from nanoq4 import train as train_module
from nanoq4.errors import NanoQ4Error
from nanoq4.train import TrainConfig, main, train
from test_mpi import (BASE, BASE_FLAGS, RUN_TIMEOUT_S, SYNC_BN_RTOL, WORKER, assert_same_run,
                      assert_stopped_before_step_4, clean_env, normwise_differences, report, weights, without_timing)

ENDS_WITHIN_S = 30  # a run whose worker or rank 0 was killed must be over by then (the watches poll twice a second)
# long enough that a process killed once training runs is killed mid-run: 3 epochs of 62 steps
LONG_FLAGS = ["--dataset", "synthetic", "--model", "simpleresnet4bit", "--epochs", "3", "--batch-size", "32",
              "--tta", "none", "--no-progress", "--workers", "2", "--out", "run"]


# ----------------------------------------------------------------------------- the collectives

def collectives(group):
    """Every collective once on each rank of `group`, with inputs that differ per rank -> on rank 0
    what each rank got, [rank 0's, rank 1's, ...]."""
    rng = np.random.default_rng(group.rank)
    # magnitudes from 1e-4 to 1e4: float32 sums whose bits depend on the order of the terms
    mine = (rng.standard_normal(4096) * 10.0 ** rng.integers(-4, 5, 4096)).astype(np.float32)
    total = group.sum(mine.copy())
    large = group.sum(np.full(100_000, group.rank + 1, np.float64))  # more than the first slots hold
    peak = group.max(np.array([(3, 1, 4)[group.rank], (-1, -5, -9)[group.rank]], np.int32))
    rows = group.allgather(np.array([group.rank, 10 * group.rank], np.int64))
    try:
        group.on_root(refuse)
        error = None
    except NanoQ4Error as e:
        error = str(e)
    return group.gather(dict(mine=mine, total=total, large=large[[0, -1]], peak=peak, rows=rows, error=error))


def refuse():
    raise NanoQ4Error("refused on rank 0")


@pytest.fixture(scope="module")
def three_ranks():
    return workers.run_on_workers(3, collectives)


def test_gather_lists_every_rank_in_rank_order(three_ranks):
    assert len(three_ranks) == 3
    for rank, got in enumerate(three_ranks):
        expected = np.random.default_rng(rank).standard_normal(4096).astype(np.float32)
        assert np.array_equal(np.sign(got["mine"]), np.sign(expected)), f"entry {rank} is not rank {rank}'s"


def test_sum_adds_in_rank_order_with_the_same_bits_on_every_rank(three_ranks):
    a, b, c = (r["mine"] for r in three_ranks)
    want = (a + b) + c
    assert want.tobytes() != (a + (b + c)).tobytes(), "these terms must make the order matter"
    for rank, got in enumerate(three_ranks):
        assert got["total"].tobytes() == want.tobytes(), f"rank {rank}'s sum"


def test_slots_grow_for_an_array_larger_than_they_were(three_ranks):
    for got in three_ranks:
        assert got["large"].tolist() == [6.0, 6.0]


def test_max_is_elementwise_on_every_rank(three_ranks):
    for got in three_ranks:
        assert got["peak"].tolist() == [4, -1]


def test_allgather_gives_every_rank_one_row_per_rank(three_ranks):
    for got in three_ranks:
        assert got["rows"].tolist() == [[0, 0], [1, 10], [2, 20]]


def test_an_error_on_rank_0_is_raised_on_every_rank(three_ranks):
    assert [got["error"] for got in three_ranks] == ["refused on rank 0"] * 3


# ----------------------------------------------------------------------------- 2 workers vs 1 process

def train_and_dump(cfg, folder, group):
    """train(cfg) on this rank of `group`, then its final weights and statistics into folder/rank<r>.npz."""
    built = []
    real_build = models.build_model
    models.build_model = lambda *a, **kw: built.append(real_build(*a, **kw)) or built[-1]
    try:
        history = train(cfg, None, group)
    finally:
        models.build_model = real_build
    np.savez(Path(folder) / f"rank{group.rank}.npz", **built[0].state_dict())
    return history


def no_process(*args, **kwargs):
    raise AssertionError("a process was started")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """BASE with --workers 1, in this process, which may start no process meanwhile."""
    folder = tmp_path_factory.mktemp("one")
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()):
        patch.setattr(multiprocessing.process.BaseProcess, "start", no_process)
        train(TrainConfig(**BASE, workers=1, out=str(folder)))
    return folder


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    """BASE on 2 workers with synchronized batch norm (--sync-bn), uninterrupted; every rank's final
    weights dumped."""
    folder = tmp_path_factory.mktemp("two")
    cfg = TrainConfig(**BASE, workers=2, sync_bn=True, out=str(folder / "run"))
    with contextlib.redirect_stdout(io.StringIO()):
        history = workers.run_on_workers(2, train_and_dump, cfg, folder)
    return folder, history


def test_a_run_with_one_worker_starts_no_process(one_process):
    config = export.load_checkpoint(one_process / "checkpoint.ckpt")["config"]
    assert config["workers"] == 1


def test_2_workers_compute_what_one_process_computes(two_workers, one_process):
    """The same global batches, with batch norm over the global batch: every weight and statistic
    agrees to float32 rounding (test_mpi's comparison)."""
    differences = normwise_differences(weights(two_workers[0] / "run"), weights(one_process))
    worst = max(differences, key=differences.get)
    assert differences[worst] <= SYNC_BN_RTOL, f"{worst} differs by {differences[worst]:.3g} (normwise)"


def test_2_workers_end_with_bit_identical_weights_and_the_checkpoint_holds_them(two_workers):
    folder, _ = two_workers
    rank0, rank1 = (np.load(folder / f"rank{r}.npz") for r in (0, 1))
    differing = [k for k in rank0.files if not np.array_equal(rank0[k], rank1[k])]
    assert not differing, f"workers 0 and 1 differ in {differing}"
    saved = weights(folder / "run")
    assert all(np.array_equal(saved[k], rank0[k]) for k in rank0.files)


def test_the_checkpoint_saves_the_resolved_workers_and_batch_norm_setting(two_workers):
    folder, history = two_workers
    ckpt = export.load_checkpoint(folder / "run" / "checkpoint.ckpt")
    assert (ckpt["config"]["workers"], ckpt["config"]["sync_bn"]) == (2, True)
    assert len(ckpt["rank_rngs"]) == 2, "one dropout stream per worker"
    assert without_timing(ckpt["history"]) == without_timing(history), "rank 0 returns the history it wrote"


# ----------------------------------------------------------------------------- stop and resume

@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """BASE with --workers 2 from the command line; rank 0 alone gets SIGTERM right after its 3rd step."""
    folder = tmp_path_factory.mktemp("stopped")
    command = [sys.executable, str(WORKER), "--signal", "TERM", "--rank", "0", "--after", "3", "--",
               *BASE_FLAGS, "--workers", "2", "--sync-bn", "--out", "run"]
    result = subprocess.run(command, cwd=folder, env=clean_env(), capture_output=True, text=True,
                            timeout=RUN_TIMEOUT_S)
    return folder, result


def test_sigterm_to_rank_0_stops_every_worker_at_the_same_batch_with_one_checkpoint(stopped_run):
    folder, result = stopped_run
    assert_stopped_before_step_4(folder, result, "python -m nanoq4.train --workers 2")
    assert "2 workers of 16 images and 1 thread(s) each, global batch-norm statistics" in result.stdout
    assert result.stderr.strip() == "", report(result)


def test_resume_with_2_workers_equals_the_uninterrupted_run(stopped_run, two_workers):
    folder, _ = stopped_run
    command = [sys.executable, "-m", "nanoq4.train", "--workers", "2", "--resume", "run/checkpoint.ckpt"]
    result = subprocess.run(command, cwd=folder, env=clean_env(), capture_output=True, text=True,
                            timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, report(result)
    assert result.stdout.count("FINAL test accuracy") == 1, result.stdout
    assert "resumed run/checkpoint.ckpt at epoch 2, batch 1" in result.stdout
    assert_same_run(folder / "run", two_workers[0] / "run")


# ----------------------------------------------------------------------------- processes killed

def children(pid):
    """{pid: command line} of the processes whose parent is `pid`."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            if entry.name.isdigit() and int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
    return found


def alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def still_alive(processes):
    """The command lines of `processes` ({pid: command line}) still running ENDS_WITHIN_S from now."""
    deadline = time.monotonic() + ENDS_WITHIN_S
    while any(alive(pid) for pid in processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [cmd for pid, cmd in processes.items() if alive(pid)]


def start_long_run(folder):
    """`python -m nanoq4.train LONG_FLAGS` started in `folder` -> (Popen, {pid: command} of its
    workers) once it trains (metrics.jsonl is written after every worker has joined)."""
    process = subprocess.Popen([sys.executable, "-m", "nanoq4.train", *LONG_FLAGS], cwd=folder, env=clean_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (folder / "run" / "metrics.jsonl").exists():
        assert process.poll() is None and time.monotonic() < deadline, "the run did not start training"
        time.sleep(0.2)
    spawned = {pid: cmd for pid, cmd in children(process.pid).items() if "spawn_main" in cmd}
    assert len(spawned) == 1, children(process.pid)
    return process, spawned


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker processes in /proc")
def test_a_killed_worker_ends_the_run_at_once_with_one_line_naming_it(tmp_path):
    process, spawned = start_long_run(tmp_path)
    started = children(process.pid)  # the worker and multiprocessing's resource tracker
    worker = next(iter(spawned))
    os.kill(worker, signal.SIGKILL)
    killed = time.monotonic()
    out, err = process.communicate(timeout=RUN_TIMEOUT_S)
    assert time.monotonic() - killed < ENDS_WITHIN_S
    lines = err.strip().splitlines()
    assert process.returncode == 2 and len(lines) == 1, f"exit {process.returncode}\n{out}\n{err}"
    assert lines[0].startswith(f"error: worker 1 of 2 (process {worker}) was killed by SIGKILL"), lines[0]
    assert "FINAL" not in out
    assert not still_alive(started), "a process outlived the run"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker processes in /proc")
def test_a_killed_rank_0_leaves_no_worker_behind(tmp_path):
    process, _ = start_long_run(tmp_path)
    started = children(process.pid)  # the worker and multiprocessing's resource tracker
    process.kill()
    process.communicate(timeout=RUN_TIMEOUT_S)
    assert not still_alive(started), "orphans of rank 0"


# ----------------------------------------------------------------------------- settings

def no_data_loading(*args, **kwargs):
    raise AssertionError("data was loaded before --workers was checked")


@pytest.mark.parametrize("value, fragment", [
    ("0", "--workers must be an integer >= 1"),
    ("-2", "--workers must be an integer >= 1"),
    ("17", "--workers 17 leaves some worker fewer than 2 images of --batch-size 32 (batch norm needs 2); "
           "choose --workers 16 or fewer"),
    ("3", "--workers 3 does not divide --batch-size 32 into equal shares; choose --workers 2 or 4, or a "
          "--batch-size that is a multiple of 3"),
])
def test_a_bad_worker_count_is_one_line_before_any_work(value, fragment, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "load_dataset", no_data_loading)
    code = main(BASE_FLAGS + ["--workers", value, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and fragment in err, err
    assert not (tmp_path / "run").exists(), "a refused run must leave no folder"


def test_under_mpiexec_there_is_one_worker_and_more_are_refused(monkeypatch):
    monkeypatch.setenv("PMI_SIZE", "2")
    cfg = TrainConfig(batch_size=256)
    assert (cfg.resolved_workers(), cfg.resolved_sync_bn()) == (1, False)
    with pytest.raises(NanoQ4Error, match="--workers 2 under mpiexec: mpiexec -n starts the processes"):
        train_module.check_workers(2, 256)


@pytest.mark.parametrize("cores, batch, count", [(2, 256, 2), (2, 128, 2), (2, 64, 1), (2, 32, 1), (1, 256, 1),
                                                 (4, 192, 3), (4, 200, 2), (8, 320, 5), (8, 1024, 8)])
def test_the_default_count_is_one_worker_per_core_with_64_images_each_that_divides_the_batch(cores, batch, count,
                                                                                             monkeypatch):
    monkeypatch.setattr(safeguards, "available_cores", lambda: cores)
    assert TrainConfig(batch_size=batch).resolved_workers() == count
    assert TrainConfig(batch_size=batch, workers=1).resolved_workers() == 1


def test_each_worker_normalizes_with_its_own_statistics_by_default(monkeypatch):
    """PyTorch DDP's default, and a tenth faster on 2 workers than --sync-bn (README)."""
    monkeypatch.setattr(safeguards, "available_cores", lambda: 2)
    cfg = TrainConfig(batch_size=256)
    assert (cfg.resolved_workers(), cfg.resolved_sync_bn()) == (2, False)
    assert TrainConfig(batch_size=256, sync_bn=True).resolved_sync_bn() is True


@pytest.fixture(scope="module")
def default_bn_workers(tmp_path_factory):
    """BASE on 2 workers from the command line with the default batch norm; rank 0 alone prints."""
    folder = tmp_path_factory.mktemp("default_bn")
    result = subprocess.run([sys.executable, "-m", "nanoq4.train", *BASE_FLAGS, "--workers", "2", "--out", "run"],
                            cwd=folder, env=clean_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, report(result)
    return folder, result


def test_default_batch_norm_on_workers_is_per_worker_and_says_so(default_bn_workers):
    folder, result = default_bn_workers
    assert "2 workers of 16 images and 1 thread(s) each, per-worker batch-norm statistics" in result.stdout
    assert export.load_checkpoint(folder / "run" / "checkpoint.ckpt")["config"]["sync_bn"] is False


def test_per_worker_statistics_are_not_the_global_ones(default_bn_workers, two_workers):
    """Each worker normalizes its own half batch: the run must differ from --sync-bn's by far more
    than rounding, or the setting would not be what it says."""
    folder, _ = default_bn_workers
    differences = normwise_differences(weights(folder / "run"), weights(two_workers[0] / "run"))
    assert max(differences.values()) > 100 * SYNC_BN_RTOL


def test_a_checkpoint_from_before_workers_resumes_with_global_statistics_on_workers():
    """Its sync_bn False was the default, each rank's own statistics under mpiexec; one process
    computed global ones, and local workers go on computing them."""
    saved = dataclasses.asdict(TrainConfig(sync_bn=False))
    cfg, _ = train_module.resumed_config(TrainConfig(resume="old.ckpt"), {k: v for k, v in saved.items()
                                                                          if k != "workers"}, given={"resume"})
    assert cfg.resolved_sync_bn() is True
    cfg, _ = train_module.resumed_config(TrainConfig(resume="new.ckpt"), saved, given={"resume"})
    assert cfg.resolved_sync_bn() is False, "a run saved with --no-sync-bn keeps it"


def test_a_run_on_workers_gives_the_caller_its_threads_back(tmp_path):
    """Rank 0 trains with its share of the cores (1 of 2); the calling process gets its thread count
    back (a later Winograd layer in the same process would otherwise run on one thread)."""
    import numba
    from nanoq4 import parallel
    parallel.set_threads(2)
    before = numba.get_num_threads()
    with contextlib.redirect_stdout(io.StringIO()):
        train(TrainConfig(**BASE, workers=2, out=str(tmp_path / "run")))
    assert numba.get_num_threads() == before
