"""The run folder's bookkeeping (nanoq4/runlog.py): Ctrl-C / SIGTERM as a stop request, the
metrics file, the printed epoch line and final report, the default run folder name."""
import json
import os
import signal

import pytest

from nanoq4 import runlog
from nanoq4.train import TrainConfig

GRID = [dict(name="0", levels_used=13, levels_total=15, frac_at_max=0.01, flip_rate=0.02, scale=0.1),
        dict(name="1", levels_used=15, levels_total=15, frac_at_max=0.03, flip_rate=0.04, scale=0.2)]
RECORD = dict(epoch=2, train_loss=1.25, train_acc=0.5, test_loss=1.5, test_acc=0.4, lr=0.05, epoch_time=12.4,
              train_images_per_s=160.2, grid=GRID)


# ----------------------------------------------------------------------------- signals

def test_ctrl_c_during_training_only_requests_a_stop():
    with runlog.StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C stops at once
            os.kill(os.getpid(), signal.SIGINT)


def test_stop_request_restores_the_previous_signal_handlers():
    def sentinel(signum, frame):
        pass

    previous = {sig: signal.signal(sig, sentinel) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with runlog.StopRequest():
            assert signal.getsignal(signal.SIGINT) is not sentinel
        assert signal.getsignal(signal.SIGINT) is sentinel
        assert signal.getsignal(signal.SIGTERM) is sentinel
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_sigterm_is_remembered_for_the_exit_code():
    with runlog.StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
    assert (stop.requested, stop.signum) == (True, signal.SIGTERM)


# ----------------------------------------------------------------------------- files and lines

def test_metrics_file_is_the_config_then_one_line_per_epoch(tmp_path):
    cfg = TrainConfig(dataset="synthetic", epochs=2)
    runlog.write_metrics(tmp_path / "metrics.jsonl", cfg, [RECORD, RECORD])
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["config"]["dataset"] == "synthetic" and lines[0]["config"]["epochs"] == 2
    assert lines[1:] == [RECORD, RECORD]


def test_epoch_line_names_the_losses_accuracies_and_grid():
    line = runlog.epoch_line(RECORD, 5)
    assert line.startswith("epoch 2/5: train loss 1.2500 acc 50.00% | test loss 1.5000 acc 40.00% | lr 5.00e-02")
    assert "levels 13/14.0/15 of 15" in line and "flips 3.00%" in line and "160 img/s" in line


def test_grid_of_a_float32_model_says_so():
    assert runlog.format_grid([]) == "grid: float32"


def test_final_report_gives_the_final_epoch_not_the_best():
    history = [dict(RECORD, epoch=1, test_acc=0.6), dict(RECORD, epoch=2, test_acc=0.4)]
    report = runlog.final_report(history, TrainConfig(tta="none"), 4 * 2**20, 2**19, 61, "runs/x/model.nq4")
    assert report.splitlines()[0] == "FINAL test accuracy (epoch 2): 40.00%"
    assert "best epoch 1: 60.00% (selected on the test set" in report
    assert "float32 4.00 MiB, int4 file 0.50 MiB (x8.0 smaller)" in report


def test_final_report_with_tta_gives_both_accuracies():
    history = [dict(RECORD, test_acc_tta=0.45, tta="flip")]
    report = runlog.final_report(history, TrainConfig(), 2**20, 2**18, 1, "m.nq4")
    assert report.splitlines()[0] == ("FINAL test accuracy (epoch 2): 45.00% with test-time augmentation flip "
                                      "(40.00% without)")


def test_final_report_says_the_batch_norm_statistics_were_re_estimated():
    history = [dict(RECORD, bn_reestimate=dict(batches=50, test_acc_before=0.375))]
    report = runlog.final_report(history, TrainConfig(tta="none"), 2**20, 2**18, 1, "m.nq4")
    assert report.splitlines()[1] == ("batch-norm statistics re-estimated over 50 training batches with the final "
                                      "weights (test accuracy without augmentation 37.50% before)")


def test_final_report_says_the_weights_were_averaged_before_the_re_estimation():
    history = [dict(RECORD, lookahead=dict(every=5, test_acc_before=0.25),
                    bn_reestimate=dict(batches=50, test_acc_before=0.375))]
    lines = runlog.final_report(history, TrainConfig(tta="none"), 2**20, 2**18, 1, "m.nq4").splitlines()
    assert lines[1] == ("weights averaged (lookahead every 5 steps): test accuracy without augmentation 25.00% with "
                        "the last trained weights")
    assert lines[2].startswith("batch-norm statistics re-estimated over 50 training batches")


def test_default_run_folder_is_new_and_names_dataset_and_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(dataset="folder:/data/pets", model="simpleresnet4bit")
    first = runlog.default_out(cfg)
    assert first.parent.name == "runs" and first.name.endswith("-folder-_data_pets-simpleresnet4bit")
    first.mkdir(parents=True)
    assert runlog.default_out(cfg) != first, "a run started in the same second gets its own folder"
