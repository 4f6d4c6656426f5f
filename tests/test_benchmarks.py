"""The benchmark scripts (benchmarks/) on tiny configurations: each part runs, returns measured
numbers that fit together, and reaches the printed report and the target table. No timing is
judged: that needs an idle machine and the default sizes.

bench_train_step's workers section runs once, on 2 workers of 4 images (global batch 8), 1 timed step:
the trainer's step on each, the gradient sum through shared memory, a barrier before the step.
bench_mpi runs once too, on 1 process and on 2 ranks, with the kind of batch norm the workers run
does not have (they have the trainer's default): between them both kinds run the benchmarks' step
on 2 processes. The other tests read these runs' numbers or need no process."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nanoq4.safeguards import available_cores
from nanoq4.train import TrainConfig
from test_mpi import RUN_TIMEOUT_S, clean_env, mpiexec, report  # noqa: F401 (mpiexec: a fixture)

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import bench_train_step  # noqa: E402

BATCH = 4  # --batch: the workers share the global batch 2 x 4
SYNC_BN_BY_DEFAULT = TrainConfig().resolved_sync_bn()


def workers_run(**settings):
    return bench_train_step.bench_workers(BATCH, steps=1, workers=2, **settings)


@pytest.fixture(scope="module")
def two_workers():
    return workers_run()


def one_process_results(step_s):
    """What bench_nanoq4 returns, as far as target_rows reads it."""
    return dict(step=step_s, shared_images_s=None, idle_images_s=10.0, faults=[0], train_rss=500.0,
                file_eval_s=1.0)


def test_the_workers_section_times_the_trainers_step_on_each_workers_share(two_workers):
    w = two_workers
    assert (w["workers"], w["global_batch"], w["trainers_choice"]) == (2, 2 * BATCH, False)
    assert w["threads"] == max(1, available_cores() // 2), "each worker runs on its share of the cores"
    assert 0 < w["sum_in_step_s"] < w["step_s"] < RUN_TIMEOUT_S
    assert w["images_per_s"] == pytest.approx(2 * BATCH / w["step_s"])
    assert w["per_batch_s"] == pytest.approx(w["step_s"] / 2), "time per --batch images: half the global step's"


def test_the_workers_batch_norm_is_the_trainers_default_unless_chosen(two_workers, monkeypatch):
    """What the workers are handed and what the report says; the other kind runs for real on 2 MPI
    ranks (bench_mpi below), through the same trainer_step code."""
    default = SYNC_BN_BY_DEFAULT
    assert (two_workers["sync_bn"], two_workers["sync_bn_default"]) == (default, True)
    handed = []

    def workers_not_started(count, target, cfg, *args):
        handed.append(cfg)
        return dict(step_s=1.0, images_per_s=8.0, sum_in_step_s=0.1, threads=1)

    monkeypatch.setattr(bench_train_step, "run_on_workers", workers_not_started)
    for choice, chosen in ((None, default), (not default, not default)):
        w = workers_run(sync_bn=choice)
        assert handed[-1].resolved_sync_bn() == chosen, "the workers' TrainerStep reads cfg.resolved_sync_bn()"
        assert (w["sync_bn"], w["sync_bn_default"]) == (chosen, choice is None)


def test_the_workers_report_prints_the_measured_numbers(two_workers):
    w = two_workers
    text = "\n".join(bench_train_step.workers_report(w, BATCH, 1, one_process_s=w["per_batch_s"] * 2,
                                                     gemm_s=w["per_batch_s"] * 4))
    assert "(--workers 2): 2 processes x 4 images (global batch 8 = 2 x --batch)" in text
    assert f"{w['step_s']:.3f} s = {w['images_per_s']:.0f} images/s" in text
    assert f"per {BATCH} images {w['per_batch_s']:.3f} s = 0.50x the one-process step, 0.25x the bare GEMM" in text
    assert f"inside the gradient sum: {w['sum_in_step_s'] * 1e3:.1f} ms" in text
    assert ("global" if w["sync_bn"] else "per-worker") + " batch-norm statistics (the trainer's default)" in text


def test_the_target_table_reads_the_step_targets_for_the_workers_too(two_workers):
    w = two_workers
    torch_step = w["per_batch_s"] / 0.4  # the workers pass <= 0.5 against PyTorch ...
    gemm_s = w["per_batch_s"] / 0.8      # ... and fail <= 0.7 against the bare GEMMs
    rows = {name: (target, value, verdict) for name, target, value, verdict in
            bench_train_step.target_rows(gemm_s, one_process_results(1.0), dict(step=torch_step, eval_s=1.0), None, w)}
    assert rows["training step, --workers 2, nanoq4/PyTorch per image"] == ("<= 0.5", "0.40", "pass")
    assert rows["training step, --workers 2 / bare GEMM per image"] == ("<= 0.7", "0.80", "FAIL")
    assert "training step, 1 process, nanoq4/PyTorch time" in rows, "the one-process rows stay"
    assert "training step, 1 process / bare im2col GEMM time" in rows


def test_the_workers_rows_read_n_a_where_the_trainer_runs_one_process():
    assert bench_train_step.bench_workers(BATCH, steps=1) is None, "8 images: too few for a second worker"
    rows = bench_train_step.target_rows(1.0, one_process_results(1.0), None, None, None)
    workers_rows = [row for row in rows if "trainer's workers" in row[0]]
    assert [row[2:] for row in workers_rows] == [("n/a", "n/a"), ("n/a", "n/a")]


def test_the_trainers_choice_names_its_count_in_the_tables():
    assert bench_train_step.workers_label(dict(workers=2, trainers_choice=True)) == "trainer's 2 workers"


@pytest.mark.parametrize("flags, fragment", [
    (["--batch", "4", "--workers", "3"], "--workers 3 does not split the global batch of 8 images"),
    (["--batch", "4", "--workers", "8"], "--workers 8 does not split the global batch of 8 images"),
    (["--workers", "2", "--no-workers"], "not allowed with argument --workers"),
])
def test_a_bad_workers_flag_is_one_line_before_any_work(flags, fragment, capsys):
    """The script's command line, parsed here: its __main__ calls main only with what this returns."""
    with pytest.raises(SystemExit) as exited:
        bench_train_step.parse_arguments(flags)
    out, err = capsys.readouterr()
    assert exited.value.code == 2, err
    assert out == "" and len(err.splitlines()) == 1 and fragment in err, err


NUMBER = r"(\d+\.\d+|\d+)"


def test_bench_mpi_times_the_trainers_step_on_one_process_and_on_2_ranks(mpiexec):  # noqa: F811
    """Both rows of its table, the ratio and the Allreduce line, measured: global batch 4, 1 timed step."""
    sync_bn = not SYNC_BN_BY_DEFAULT  # bench_mpi's own default is per-rank statistics, --sync-bn the other
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_mpi.py"), "--batch", "4", "--steps", "1"]
                          + (["--sync-bn"] if sync_bn else []),
                          capture_output=True, text=True, timeout=3 * RUN_TIMEOUT_S, env=clean_env())
    assert done.returncode == 0, report(done)
    cores = available_cores()
    one = re.search(rf"^1 process x {cores} threads +{NUMBER} +{NUMBER} +-$", done.stdout, re.M)
    name = f"2 ranks x {max(1, cores // 2)} thread(s)" + (" sync-BN" if sync_bn else "")
    ranks = re.search(rf"^{re.escape(name)} +{NUMBER} +{NUMBER} +{NUMBER}$", done.stdout, re.M)
    assert one and ranks, report(done)
    step_s, images_per_s, sum_ms = map(float, ranks.groups())
    assert float(one[1]) > 0 and 0 < sum_ms / 1e3 < step_s, report(done)
    assert images_per_s == pytest.approx(4 / step_s, rel=0.01, abs=1), "images/s of the global batch"
    assert re.search(rf"^2 ranks / 1 process: {NUMBER}x the images/s$", done.stdout, re.M), report(done)
    assert re.search(rf"^gradient buffer {NUMBER} MB: in-place Allreduce \(buffer method\) {NUMBER} ms, "
                     rf"pickled lowercase allreduce {NUMBER} ms", done.stdout, re.M), report(done)
