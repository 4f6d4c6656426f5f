"""Data-parallel training over MPI (nanoq4/distributed.py): `mpiexec -n 2` runs of the trainer on
the synthetic dataset, through tests/mpi_worker.py, against one process and against each other.

The runs need mpi4py and mpiexec (the `mpi` extra, also in `test`): without them they are skipped,
except under CI, where they fail. The tests of the pieces (sharded batches, synchronized batch-norm
arithmetic, the gradient buffer, the one-line errors before MPI starts) run everywhere."""
import contextlib
import importlib.util
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import nanoq4
from nanoq4 import data, distributed, export, kernels, nn
from nanoq4.data import CIFAR_MEAN, CIFAR_STD, BatchLoader
from nanoq4.errors import NanoQ4Error
from nanoq4.tensor import Tensor
from nanoq4.train import TrainConfig, train

WORKER = Path(__file__).with_name("mpi_worker.py")
PACKAGE_ROOT = str(Path(nanoq4.__file__).resolve().parents[1])  # the folder that holds the nanoq4 under test
RUN_TIMEOUT_S = 300  # a run takes seconds; the limit only turns a hang into a failure
# 2 epochs of 2 steps of 32 images (16 per rank): a mid-epoch stop, an epoch boundary, few seconds.
BASE = dict(dataset="synthetic", model="simpleresnet4bit", epochs=2, max_steps_per_epoch=2, batch_size=32, seed=5,
            tta="none", dropout=0.0, progress=False)
BASE_FLAGS = ["--dataset", "synthetic", "--model", "simpleresnet4bit", "--epochs", "2", "--max-steps-per-epoch", "2",
              "--batch-size", "32", "--seed", "5", "--tta", "none", "--dropout", "0", "--no-progress"]
# One full epoch of 32 steps of 64 images (32 per rank), warm-up over the first quarter.
FULL_EPOCH_FLAGS = ["--dataset", "synthetic", "--model", "simpleresnet4bit", "--epochs", "1", "--batch-size", "64",
                    "--warmup-epochs", "0.25", "--tta", "none", "--no-progress"]
# normwise, per tensor. BASE measured 4.9e-7 at worst with Winograd F(2x2); F(4x4)'s transforms carry
# more float32 rounding (winograd.py), and the two computations (half batches on 2 ranks, the whole
# batch in one process) round differently: 1.07e-4 at worst (a batch-norm bias), weights ~1e-5. The
# per-rank statistics of the default differ by 0.57 (test_default_local_bn_...).
SYNC_BN_RTOL = 1e-3
CURVES = ["curves.png"] if importlib.util.find_spec("matplotlib") else []  # written when the plot extra is installed


def files_in(folder):
    return sorted(p.name for p in folder.iterdir())


def clean_env(**extra):
    """This environment without an MPI launcher's variables (as if started from a shell), with the
    nanoq4 under test first on PYTHONPATH: a process started in another folder or by mpiexec runs this
    code, not an installed copy (CI's `pip install .`, an editable install of another checkout), and
    loads the kernels this session compiled from the same Numba cache instead of compiling them again."""
    env = {k: v for k, v in os.environ.items() if k not in distributed.LAUNCH_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join([PACKAGE_ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    env.update(extra)
    return env


def find_mpiexec():
    beside_python = Path(sys.executable).with_name("mpiexec")  # the mpich wheel installs it in the venv
    return str(beside_python) if beside_python.is_file() else shutil.which("mpiexec")


@pytest.fixture(scope="module")
def mpiexec():
    """mpiexec's path; missing MPI skips the test locally and fails it under CI."""
    missing = [name for name, found in (("mpi4py", importlib.util.find_spec("mpi4py")), ("mpiexec", find_mpiexec()))
               if not found]
    if missing:
        message = f"{' and '.join(missing)} not installed (pip install \".[mpi]\")"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return find_mpiexec()


def run_ranks(mpiexec, cwd, flags, worker_options=(), ranks=2, env=None):
    """`mpiexec -n ranks python tests/mpi_worker.py OPTIONS -- FLAGS` in `cwd` -> CompletedProcess."""
    command = [mpiexec, "-n", str(ranks), sys.executable, str(WORKER), *worker_options, "--", *flags]
    return subprocess.run(command, cwd=cwd, env=env or clean_env(), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)


def report(result):
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def weights(folder):
    return export.load_checkpoint(Path(folder) / "checkpoint.ckpt")["model"]


def without_timing(history):
    return [{k: v for k, v in r.items() if k not in ("epoch_time", "train_images_per_s")} for r in history]


# ----------------------------------------------------------------------------- 2 ranks vs 1 process

@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """BASE in this process: the reference of the sync-BN comparison."""
    folder = tmp_path_factory.mktemp("one")
    with contextlib.redirect_stdout(io.StringIO()):
        train(TrainConfig(**BASE, out=str(folder)))
    return folder


@pytest.fixture(scope="module")
def sync_bn_run(mpiexec, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sync")
    result = run_ranks(mpiexec, folder, BASE_FLAGS + ["--sync-bn", "--out", "run"])
    assert result.returncode == 0, report(result)
    return folder / "run"


@pytest.fixture(scope="module")
def local_bn_run(mpiexec, tmp_path_factory):
    """BASE on 2 ranks with per-rank batch norm (the default), uninterrupted, every rank's final weights
    dumped; run in an empty folder, to see what the job writes."""
    folder = tmp_path_factory.mktemp("local")
    result = run_ranks(mpiexec, folder, BASE_FLAGS + ["--out", "run"], ["--dump", "dump"])
    assert result.returncode == 0, report(result)
    return folder, result


def normwise_differences(got, want):
    """{tensor: ||got - want|| / ||want||} over a state dict (weights and batch-norm statistics)."""
    assert list(got) == list(want)
    return {k: float(np.linalg.norm(got[k] - want[k]) / max(np.linalg.norm(want[k]), 1e-30)) for k in want}


def test_sync_bn_on_2_ranks_computes_what_one_process_computes(sync_bn_run, one_process):
    """Same seed and global batch (augmentation included), 4 steps: every weight and running
    statistic agrees to float32 rounding. (Longer runs drift apart once a weight sits on a 4-bit rounding boundary, w/scale
    = k + 0.5 within an ulp, and rounds the other way in one of them; after 6 steps it happened.)"""
    differences = normwise_differences(weights(sync_bn_run), weights(one_process))
    worst = max(differences, key=differences.get)
    assert differences[worst] <= SYNC_BN_RTOL, f"{worst} differs by {differences[worst]:.3g} (normwise)"


def test_sync_bn_on_2_ranks_reports_the_losses_of_one_process(sync_bn_run, one_process):
    got = export.load_checkpoint(sync_bn_run / "checkpoint.ckpt")["history"]
    want = export.load_checkpoint(one_process / "checkpoint.ckpt")["history"]
    for key in ("train_loss", "test_loss"):
        assert [r[key] for r in got] == pytest.approx([r[key] for r in want], rel=1e-5), key


def test_default_local_bn_is_not_the_global_batch_statistics(local_bn_run, one_process):
    """Per-rank statistics (PyTorch DDP's default) normalize each half-batch on its own: the
    comparison above must then fail, or --sync-bn would not be what makes it pass."""
    folder, _ = local_bn_run
    differences = normwise_differences(weights(folder / "run"), weights(one_process))
    assert max(differences.values()) > 100 * SYNC_BN_RTOL


# ----------------------------------------------------------------------------- what the ranks hold and write

@pytest.fixture(scope="module")
def full_epoch_run(mpiexec, tmp_path_factory):
    folder = tmp_path_factory.mktemp("full")
    result = run_ranks(mpiexec, folder, FULL_EPOCH_FLAGS + ["--out", "run"], ["--dump", "dump"])
    assert result.returncode == 0, report(result)
    return folder


def test_2_ranks_with_local_bn_learn_the_synthetic_patterns(full_epoch_run):
    history = export.load_checkpoint(full_epoch_run / "run" / "checkpoint.ckpt")["history"]
    assert history[-1]["test_acc"] >= 0.90, f"test accuracy {history[-1]['test_acc']:.2%} after one epoch (99.4% measured)"


def test_every_rank_ends_with_bit_identical_weights_and_statistics(full_epoch_run):
    rank0, rank1 = (np.load(full_epoch_run / "dump" / f"rank{r}.npz") for r in (0, 1))
    assert rank0.files == rank1.files and len(rank0.files) == 38
    differing = [k for k in rank0.files if not np.array_equal(rank0[k], rank1[k])]
    assert not differing, f"ranks 0 and 1 differ in {differing}"


def test_bn_reestimate_with_per_rank_batch_norm_leaves_every_rank_the_same_statistics(mpiexec, tmp_path):
    """Each rank re-estimates on its shards of the batches; the statistics are then averaged over the
    ranks, so every rank (and the checkpoint rank 0 writes) holds the same."""
    result = run_ranks(mpiexec, tmp_path, BASE_FLAGS + ["--bn-reestimate", "2", "--out", "run"], ["--dump", "dump"])
    assert result.returncode == 0, report(result)
    assert "re-estimated over 2 training batches" in result.stdout
    rank0, rank1 = (np.load(tmp_path / "dump" / f"rank{r}.npz") for r in (0, 1))
    differing = [k for k in rank0.files if not np.array_equal(rank0[k], rank1[k])]
    assert not differing, f"ranks 0 and 1 differ in {differing}"
    saved = weights(tmp_path / "run")
    assert all(np.array_equal(saved[k], rank0[k]) for k in rank0.files)


def test_lookahead_on_2_ranks_averages_the_same_weights_on_every_rank(mpiexec, tmp_path):
    """Every rank holds the same weights and statistics, so the slow copies agree (check_same covers them
    at each epoch end): the ranks end bit-identical, on the averaged weights the checkpoint holds."""
    flags = BASE_FLAGS + ["--lookahead", "2", "--bn-reestimate", "2", "--out", "run"]
    result = run_ranks(mpiexec, tmp_path, flags, ["--dump", "dump"])
    assert result.returncode == 0, report(result)
    assert "weights averaged (lookahead every 2 steps)" in result.stdout
    rank0, rank1 = (np.load(tmp_path / "dump" / f"rank{r}.npz") for r in (0, 1))
    differing = [k for k in rank0.files if not np.array_equal(rank0[k], rank1[k])]
    assert not differing, f"ranks 0 and 1 differ in {differing}"
    ckpt = export.load_checkpoint(tmp_path / "run" / "checkpoint.ckpt")
    assert all(np.array_equal(ckpt["model"][k], rank0[k]) for k in rank0.files)
    parameters = [k for k in rank0.files if not k.endswith(("running_mean", "running_var"))]
    assert all(np.array_equal(ckpt["lookahead"][k], rank0[k]) for k in parameters), "not the averaged weights"


def test_the_checkpoint_holds_the_weights_of_the_ranks(full_epoch_run):
    rank0 = np.load(full_epoch_run / "dump" / "rank0.npz")
    saved = weights(full_epoch_run / "run")
    assert all(np.array_equal(saved[k], rank0[k]) for k in rank0.files)


def test_only_rank_0_prints_and_writes(local_bn_run):
    folder, result = local_bn_run
    assert files_in(folder) == ["dump", "run"], "a rank wrote outside --out"
    assert files_in(folder / "run") == sorted(["checkpoint.ckpt", "metrics.jsonl", "model.nq4"] + CURVES)
    assert result.stdout.count("FINAL test accuracy") == 1 and result.stdout.count("epoch 2/2:") == 1, result.stdout
    assert "2 ranks of 16 images" in result.stdout


def test_the_checkpoint_keeps_every_rank_s_dropout_stream(local_bn_run):
    """4 optimizer steps (2 epochs of 2 global batches), and one generator state per rank."""
    folder, _ = local_bn_run
    ckpt = export.load_checkpoint(folder / "run" / "checkpoint.ckpt")
    assert ckpt["optimizer"]["step_count"] == 4
    assert len(ckpt["rank_rngs"]) == 2 and ckpt["rank_rngs"][0] != ckpt["rank_rngs"][1], "one dropout stream per rank"


# ----------------------------------------------------------------------------- stop, resume, failures

@pytest.fixture(scope="module")
def stopped_run(mpiexec, tmp_path_factory):
    """BASE on 2 ranks where only rank 1 gets SIGTERM, right after its 3rd step."""
    folder = tmp_path_factory.mktemp("stopped")
    result = run_ranks(mpiexec, folder, BASE_FLAGS + ["--out", "run"], ["--signal", "TERM", "--rank", "1", "--after", "3"])
    return folder, result


def test_a_signal_to_one_rank_stops_all_at_the_same_batch_with_one_checkpoint(stopped_run):
    folder, result = stopped_run
    assert_stopped_before_step_4(folder, result, "mpiexec -n 2 python -m nanoq4.train")


def assert_stopped_before_step_4(folder, result, command):
    """A BASE run in `folder` stopped by SIGTERM after 3 steps: exit 143, one checkpoint saved before the
    4th step (epoch 2, step 2) and the line that says how to continue with `command`."""
    assert result.returncode == 143, report(result)
    assert result.stdout.count("interrupted: saved") == 1, result.stdout
    assert f"continue with: {command} --resume run/checkpoint.ckpt" in result.stdout
    ckpt = export.load_checkpoint(folder / "run" / "checkpoint.ckpt")
    assert (ckpt["epoch"], ckpt["batch"]) == (1, 1), "saved before the 4th step (epoch 2, step 2)"
    assert files_in(folder) == ["run"]
    assert files_in(folder / "run") == sorted(["checkpoint.ckpt", "metrics.jsonl"] + CURVES)


def test_resume_under_2_ranks_equals_the_uninterrupted_run(stopped_run, local_bn_run, mpiexec):
    folder, _ = stopped_run
    result = run_ranks(mpiexec, folder, ["--resume", "run/checkpoint.ckpt"])
    assert result.returncode == 0, report(result)
    assert "resumed run/checkpoint.ckpt at epoch 2, batch 1" in result.stdout
    assert_same_run(folder / "run", local_bn_run[0] / "run")


def assert_same_run(resumed, reference):
    """The run folder `resumed` ends as `reference` did: the same weights, history and model file."""
    got, want = (export.load_checkpoint(f / "checkpoint.ckpt") for f in (resumed, reference))
    differing = [k for k in want["model"] if not np.array_equal(got["model"][k], want["model"][k])]
    assert not differing, f"weights differ from the uninterrupted run: {differing}"
    assert without_timing(got["history"]) == without_timing(want["history"])
    assert (resumed / "model.nq4").read_bytes() == (reference / "model.nq4").read_bytes()
    assert files_in(resumed) == sorted(["checkpoint.ckpt", "metrics.jsonl", "model.nq4"] + CURVES)


def test_ranks_whose_weights_diverge_stop_the_run(mpiexec, tmp_path):
    result = run_ranks(mpiexec, tmp_path, BASE_FLAGS + ["--out", "run"], ["--nudge", "--rank", "1", "--after", "1"])
    assert result.returncode == 2, report(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the ranks diverged by the end of epoch 1"), report(result)
    assert "rank(s) 1" in lines[0]


def test_a_failing_rank_ends_the_job_with_its_error(mpiexec, tmp_path):
    result = run_ranks(mpiexec, tmp_path, BASE_FLAGS + ["--out", "run"], ["--fail", "--rank", "1", "--after", "1"])
    assert result.returncode != 0, report(result)
    assert "rank 1 of 2 failed" in result.stderr and "RuntimeError: simulated failure of one rank" in result.stderr
    assert "FINAL" not in result.stdout


# ----------------------------------------------------------------------------- one-line errors

def one_error_line(result):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), report(result)
    return lines[0]


def test_a_global_batch_that_does_not_split_evenly_is_one_line(mpiexec, tmp_path):
    result = run_ranks(mpiexec, tmp_path, BASE_FLAGS + ["--batch-size", "33", "--out", "run"])
    line = one_error_line(result)
    assert "--batch-size 33" in line and "2 ranks" in line and "32 or 34" in line
    assert not list(tmp_path.iterdir()), "no folder for a refused run"


def test_an_unknown_flag_under_mpiexec_is_one_line(mpiexec, tmp_path):
    result = run_ranks(mpiexec, tmp_path, BASE_FLAGS + ["--batch-sise", "32"])
    assert "--batch-sise" in one_error_line(result)


def fake_missing_mpi4py(tmp_path):
    """A PYTHONPATH whose mpi4py cannot be imported, as when it is not installed."""
    shim = tmp_path / "shim" / "mpi4py"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'mpi4py'\", name='mpi4py')\n")
    env = clean_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "shim"), env["PYTHONPATH"]])
    return env


def test_missing_mpi4py_under_mpiexec_is_one_line_naming_the_extra(mpiexec, tmp_path):
    result = run_ranks(mpiexec, tmp_path, BASE_FLAGS + ["--out", "run"], env=fake_missing_mpi4py(tmp_path))
    assert 'pip install "nanoq4[mpi]"' in one_error_line(result)
    assert not (tmp_path / "run").exists()


def test_missing_mpi4py_is_reported_by_rank_0_alone(tmp_path):
    """No MPI needed: the variables mpiexec sets are enough to be taken for a rank."""
    command = [sys.executable, "-m", "nanoq4.train"] + BASE_FLAGS + ["--out", "run"]
    stderr = {}
    for rank in (0, 1):
        env = fake_missing_mpi4py(tmp_path / str(rank))
        env.update(PMI_RANK=str(rank), PMI_SIZE="2")
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        assert result.returncode == 2, report(result)
        stderr[rank] = result.stderr.strip().splitlines()
    assert len(stderr[0]) == 1 and 'pip install "nanoq4[mpi]"' in stderr[0][0], stderr
    assert stderr[1] == [], "rank 1 repeats rank 0's error"
    assert not (tmp_path / "run").exists()


def test_without_mpiexec_mpi4py_is_never_imported(tmp_path):
    code = ("import sys\nfrom nanoq4 import distributed, train\n"
            "group = distributed.world()\n"
            "assert type(group).__name__ == 'SingleProcess' and group.size == 1, group\n"
            "assert not any(m.startswith('mpi4py') for m in sys.modules), 'mpi4py was imported'\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=clean_env(), capture_output=True,
                            text=True, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, report(result)


def test_batch_split_refusals_name_the_flag():
    distributed.check_batch_split(32, 1, False)
    distributed.check_batch_split(32, 4, False)
    with pytest.raises(NanoQ4Error, match=r"--batch-size 30 \(the global batch\) does not split evenly across 4 ranks"):
        distributed.check_batch_split(30, 4, False)
    with pytest.raises(NanoQ4Error, match="1 image per step.*--sync-bn"):
        distributed.check_batch_split(4, 4, False)
    distributed.check_batch_split(4, 4, True)  # synchronized batch norm sees the 4 images


# ----------------------------------------------------------------------------- the pieces, without MPI

def loader(shard=0, shards=1, n=100, batch_size=32, flip="random"):
    x, y = data.synthetic_dataset(n_train=n, n_test=1).x_train, np.arange(n) % 10
    return BatchLoader(x, y, batch_size, CIFAR_MEAN, CIFAR_STD, augment=True, shuffle=True, seed=3, shard=shard,
                       shards=shards, flip=flip)


@pytest.mark.parametrize("flip", data.FLIP_MODES)
def test_the_shards_of_each_batch_are_the_batch_of_one_process(flip):
    """Disjoint shards whose union, in rank order, is the same images with the same crops and flips."""
    whole = loader(flip=flip)
    whole.set_epoch(2)
    shards = [loader(r, 2, flip=flip) for r in range(2)]
    for s in shards:
        s.set_epoch(2)
    for k, ((x, y), (x0, y0), (x1, y1)) in enumerate(zip(whole, *shards)):
        assert np.array_equal(np.concatenate([x0, x1]), x) and np.array_equal(np.concatenate([y0, y1]), y), k
        assert shards[0].global_batch_len(k) == len(y)


def test_a_last_batch_too_small_for_2_images_per_shard_is_left_out():
    assert len(loader()) == 4 and len(loader(0, 2)) == 4  # 100 = 3 x 32 + 4: 2 images per shard
    assert len(loader(0, 4)) == 3 and len(loader(0, 1, n=97)) == 4  # 4 < 2 x 4 shards; one process keeps it
    assert [len(y) for _, y in loader(1, 2)] == [16, 16, 16, 2]


def test_synchronized_batch_norm_backward_over_two_halves_equals_the_whole_batch():
    """Two ranks simulated in one process: each half's dx with the summed statistics is that half
    of the whole batch's dx; the halves' dgamma, dbeta add up to the whole batch's."""
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal((2, 64, 8), dtype=np.float32)  # float32, as in training
    gamma = rng.uniform(0.5, 1.5, 8).astype(np.float32)
    mean, var = kernels.channel_mean_var(x)
    inv_std = 1 / np.sqrt(var + 1e-5)
    y = ((x - mean) * inv_std * gamma).astype(np.float32)
    whole = kernels.batch_norm_backward(dy, x, y, mean, inv_std, gamma, relu=True)
    halves = [slice(0, 32), slice(32, 64)]
    recorded = []

    def record(sums, m):
        recorded.append((sums.copy(), m))
        return sums, m

    for h in halves:
        kernels.batch_norm_backward(dy[h], x[h], y[h], mean, inv_std, gamma, True, record)
    total = (recorded[0][0] + recorded[1][0], recorded[0][1] + recorded[1][1])
    parts = [kernels.batch_norm_backward(dy[h], x[h], y[h], mean, inv_std, gamma, True, lambda s, m: total)
             for h in halves]
    np.testing.assert_allclose(np.concatenate([p[0] for p in parts]), whole[0], rtol=1e-5, atol=1e-6)
    for i, name in ((1, "dgamma"), (2, "dbeta")):
        np.testing.assert_allclose(parts[0][i] + parts[1][i], whole[i], rtol=1e-5, atol=1e-6, err_msg=name)


def test_synchronized_batch_norm_forward_normalizes_with_the_global_statistics():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 4, 4, 8)).astype(np.float32) * 3 + 1
    whole = nn.BatchNorm2d(8)
    expected = whole(Tensor(x)).data
    other = kernels.channel_sums(x[32:].reshape(-1, 8))
    half = nn.BatchNorm2d(8)
    half.sync = lambda sums, m: (sums + other, m + 32 * 16)
    got = half(Tensor(x[:32])).data
    np.testing.assert_allclose(got, expected[:32], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(half.running_mean, whole.running_mean, rtol=1e-6)
    np.testing.assert_allclose(half.running_var, whole.running_var, rtol=1e-6)


def test_gradient_sum_packs_every_gradient_and_reads_the_sum_back():
    """With a sum that doubles the buffer (two ranks holding the same values), every gradient
    comes back doubled at its own place, the statistics and loss weighted by the share."""
    params = [nn.Parameter(np.arange(6.0).reshape(2, 3)), nn.Parameter(np.ones(4)), nn.Parameter(np.zeros(2))]
    params[0].grad, params[1].grad = np.full((2, 3), 0.5, np.float32), np.arange(4, dtype=np.float32)
    buffer = np.array([1.0, 3.0], np.float32)
    loss, correct = distributed.GradientSum(params, [buffer], lambda flat: flat.__imul__(2))(2.0, 7, 0.25)
    np.testing.assert_array_equal(params[0].grad, np.ones((2, 3)))
    np.testing.assert_array_equal(params[1].grad, 2 * np.arange(4))
    assert params[2].grad is None, "a parameter without a gradient keeps none"
    np.testing.assert_array_equal(buffer, [0.5, 1.5])
    assert (loss, correct) == (1.0, 14)


def test_the_checksum_sees_a_one_ulp_change():
    state = [{"w": np.ones((3, 3), np.float32)}, [(np.zeros(2), 1)]]
    before = distributed.state_checksum(state)
    state[0]["w"][1, 1] = np.nextafter(np.float32(1), np.float32(2))
    assert distributed.state_checksum(state) != before
