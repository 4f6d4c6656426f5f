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
print(accepted, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, size // 4096)
"""


def second_use_faults(mode):
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    accepted, faults, pages = out.stdout.split()
    return accepted, int(faults), int(pages)


def test_freed_memory_is_reused_without_page_faults():
    accepted, faults, pages = second_use_faults("keep")
    if accepted != "True":
        pytest.skip("no glibc malloc here: keep_freed_memory() changes nothing")
    assert faults < pages // 20, f"{faults} page faults for a block of {pages} pages used a second time"


def test_without_it_the_same_block_faults_again():
    """The control: with malloc's defaults the second use maps the block anew and faults in
    (nearly) every page, so the test above measures the setting, not the allocator's luck."""
    accepted, faults, pages = second_use_faults("default")
    _, kept_faults, _ = second_use_faults("keep")
    if kept_faults >= pages // 20:
        pytest.skip("no glibc malloc here")
    assert faults > pages // 2
