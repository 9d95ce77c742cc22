"""util.memory: a run on the CPU hands back the resident pages of torch's GPU libraries."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT
from util import memory

SITE = "/venv/lib/python3.11/site-packages"
MAPS = [
    f"7f0000000000-7f0000100000 r--p 00000000 08:01 1234  {SITE}/nvidia/cublas/lib/libcublasLt.so.13",
    f"7f0000100000-7f0000300000 r-xp 00100000 08:01 1234  {SITE}/nvidia/cublas/lib/libcublasLt.so.13",
    "7f0000300000-7f0000400000 rw-p 00000000 00:00 0 ",  # its zero-initialised data: anonymous
    f"7f0000400000-7f0000500000 r-xp 00000000 08:01 99  {SITE}/torch/lib/libtorch_cpu.so",
    f"7f0000500000-7f0000600000 r-xp 00000000 08:01 98  {SITE}/torch/lib/libtorch_cuda.so",
    f"7f0000600000-7f0000700000 r-xp 00000000 08:01 97  {SITE}/triton/_C/libtriton.so",
    f"7f0000700000-7f0000800000 r-xp 00000000 08:01 96  {SITE}/onnxruntime/capi/libonnxruntime.so",
    "7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0  [stack]",
]


def test_only_the_gpu_libraries_files_are_chosen() -> None:
    found = memory.gpu_library_mappings(MAPS)
    assert [(hex(start), hex(end)) for start, end, _ in found] == [
        ("0x7f0000000000", "0x7f0000100000"),
        ("0x7f0000100000", "0x7f0000300000"),
        ("0x7f0000500000", "0x7f0000600000"),
        ("0x7f0000600000", "0x7f0000700000"),
    ]
    assert [path.rsplit("/", 1)[1] for *_, path in found] == [
        "libcublasLt.so.13",
        "libcublasLt.so.13",
        "libtorch_cuda.so",
        "libtriton.so",
    ]


def test_nothing_is_paged_out_where_a_gpu_can_run_the_libraries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_libc(*args: object, **kwargs: object) -> None:
        raise AssertionError("madvise must not be reached with a GPU present")

    monkeypatch.setattr(memory.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(memory.ctypes, "CDLL", no_libc)
    assert memory.page_out_gpu_libraries() is None


#: Run in a fresh interpreter, whose pages are all its own: the kernel leaves a page
#: alone while another process maps it, so the test's process lets go of its own first.
PAGE_OUT = """
import json, torch
from util.memory import gpu_library_resident_mb, page_out_gpu_libraries

torch.manual_seed(0)
x = torch.randn(4, 2, 64, 101)
conv = torch.nn.Conv2d(2, 16, 3, padding=1)
expected = conv(x)
before = gpu_library_resident_mb()
released = page_out_gpu_libraries()
after = gpu_library_resident_mb()
print(json.dumps({"before": before, "after": after, "released": released,
                  "same": bool(torch.equal(conv(x), expected))}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and madvise are Linux's")
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the libraries stay")
def test_a_cpu_process_hands_back_the_gpu_libraries_pages_and_still_computes() -> None:
    memory.page_out_gpu_libraries()
    run = subprocess.run(
        [sys.executable, "-c", PAGE_OUT], capture_output=True, text=True, cwd=ROOT, check=True
    )
    got = json.loads(run.stdout.strip().splitlines()[-1])
    if got["before"] == 0:
        pytest.skip("this torch build maps no GPU library (a CPU wheel)")
    if got["released"] is None:
        pytest.skip("this kernel refuses madvise(MADV_PAGEOUT)")
    assert got["after"] < got["before"], got
    assert got["released"] > 0, got
    assert got["same"], "the model computed something else after the page-out"
