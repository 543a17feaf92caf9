"""The machine a run trains on (`llmlab.machine`): device choice, and the clock torchrun's ranks agree on."""

from __future__ import annotations

import pytest
import torch

from llmlab import machine
from llmlab.errors import UserError


def _agree(rank: int, store_path: str, readings: list[tuple[float, bool]], answers) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    try:
        d = machine.Dist(rank, 2, torch.device("cpu"))
        answers.put((rank, [machine.agreed(elapsed, flag, d) for elapsed, flag in readings]))
    finally:
        dist.destroy_process_group()


def test_every_rank_trains_on_one_clock_and_stops_on_any_ranks_ctrl_c():
    """Two gloo processes, each with its own clock and Ctrl-C; reference: max() and any(). The
    learning rate follows the agreed clock, so the ranks take the same step (their weights drifted
    apart under --max-minutes before) and stop at the same one."""
    import tempfile

    import torch.multiprocessing as mp

    readings = {0: [(1.0, False), (2.5, True), (3.0, False)], 1: [(1.25, False), (2.0, False), (3.5, True)]}
    ctx = mp.get_context("spawn")
    answers = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_agree, args=(r, f"{tmp}/store", readings[r], answers)) for r in (0, 1)]
        try:
            for proc in procs:
                proc.start()
            got = dict(answers.get(timeout=120) for _ in procs)
        finally:
            for proc in procs:
                proc.join(timeout=60)
                proc.kill()
    expected = [(max(a[0], b[0]), a[1] or b[1]) for a, b in zip(readings[0], readings[1], strict=True)]
    assert got[0] == got[1] == expected


def test_device_selection():
    assert machine.pick_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert machine.pick_device("auto").type == expected
    with pytest.raises(UserError, match="unknown device 'tpu9'"):
        machine.pick_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            machine.pick_device("cuda")
    else:
        with pytest.raises(UserError, match="CUDA device\\(s\\), numbered from 0"):
            machine.pick_device(f"cuda:{torch.cuda.device_count()}")
    if not torch.backends.mps.is_available():  # was PyTorch's traceback, "not linked with support for mps"
        with pytest.raises(UserError, match="no Apple-silicon GPU"):
            machine.pick_device("mps")
    for other in ("meta", "xpu", "hpu"):  # devices torch names but llmlab does not run on: were tracebacks
        with pytest.raises(UserError, match=f"device '{other}' is not one llmlab runs on"):
            machine.pick_device(other)


def test_cpuinfo_reads_the_first_line_of_a_field(monkeypatch, tmp_path):
    """Reference: a /proc/cpuinfo written here, two processors, and none at all."""
    cpuinfo = machine.cpuinfo
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2\n"
                    "processor\t: 1\nvendor_id\t: GenuineIntel\n")  # fmt: skip
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: real_open(fake if p == "/proc/cpuinfo" else p, *a, **k))
    got = cpuinfo("vendor_id"), cpuinfo("model name"), cpuinfo("flags")
    assert got == ("AuthenticAMD", "AMD EPYC 7B13", "fpu avx2")
    assert cpuinfo("model") is None and cpuinfo("bogomips") is None  # a prefix of a field is not the field
    fake.unlink()
    assert cpuinfo("flags") is None
