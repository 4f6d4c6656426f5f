"""nanoq4.memory: after keep_freed_memory(), a large block that is freed and allocated again
comes back without page faults. Each case runs in a fresh interpreter, so the malloc settings
of this test process stay as they were."""
import subprocess
import sys

import pytest

PROBE = """
import resource, sys
import numpy as np
from nanoq4 import memory
accepted = memory.keep_freed_memory() if sys.argv[1] == "keep" else None
size = 96 << 20  # above glibc's largest mmap threshold (32 MiB)
a = np.ones(size // 8); del a  # first use: the pages are faulted in either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
a = np.ones(size // 8); del a  # second use of a block of the same size
print(accepted, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, size >> 21)
"""


def second_use_faults(mode):
    """(keep_freed_memory()'s answer, page faults of the second use, 2 MiB pages in the block).
    A fresh mapping faults at least once per 2 MiB even with transparent huge pages (NumPy asks
    for them on large arrays), once per 4 KiB without."""
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    accepted, faults, huge_pages = out.stdout.split()
    return accepted, int(faults), int(huge_pages)


def test_freed_memory_is_reused_without_page_faults():
    accepted, faults, huge_pages = second_use_faults("keep")
    if accepted != "True":
        pytest.skip("no glibc malloc here: keep_freed_memory() changes nothing")
    assert faults < huge_pages // 4, f"{faults} page faults for a block of {huge_pages} x 2 MiB used a second time"


def test_without_it_the_same_block_faults_again():
    """The control: with malloc's defaults the second use maps the block anew and faults in every
    page of it, so the test above measures the setting, not the allocator's luck."""
    accepted, _, _ = second_use_faults("keep")
    if accepted != "True":
        pytest.skip("no glibc malloc here")
    _, faults, huge_pages = second_use_faults("default")
    assert faults >= huge_pages


def test_the_trainer_keeps_freed_memory(monkeypatch, tmp_path):
    from nanoq4 import memory
    from nanoq4.train import main
    calls = []
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: calls.append(True) or True)
    code = main(["--dataset", "synthetic", "--model", "simpleresnet4bit", "--epochs", "1", "--max-steps-per-epoch",
                 "1", "--batch-size", "8", "--tta", "none", "--no-progress", "--out", str(tmp_path / "run")])
    assert code == 0 and calls == [True]
