"""The machine a run trains on: its device, and under torchrun its place among the processes.

`pick_device("auto")` takes CUDA, then Apple's MPS, then the CPU. torchrun starts one process per
device and sets RANK, WORLD_SIZE and LOCAL_RANK; `setup_distributed` joins them into one process
group (NCCL on CUDA, gloo on the CPU) and returns this process's `Dist`. Without torchrun it is
a single process, rank 0 of 1. Rank 0 alone writes the run directory and prints the summary.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from llmlab.errors import UserError


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


DEVICES = ("cpu", "cuda", "mps")  # the device types llmlab runs on (`auto` tries cuda, then mps, then cpu)


def pick_device(name: str) -> torch.device:
    """`name` ("auto", "cpu", "cuda", "cuda:1", "mps") as a device this machine has, or a UserError."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UserError(f"unknown device {name!r} (try auto, cpu, cuda, mps)") from None
        if device.type not in DEVICES:
            raise UserError(f"device {name!r} is not one llmlab runs on (try auto, cpu, cuda, mps)")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError("device cuda was asked for, but no CUDA device is available")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device {name} was asked for, but this machine has {torch.cuda.device_count()} CUDA "
                            "device(s), numbered from 0")  # fmt: skip
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise UserError("device mps was asked for, but no Apple-silicon GPU (MPS) is available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def setup_distributed(device_name: str) -> Dist:
    """torchrun sets RANK and WORLD_SIZE; without them this is a single process."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Dist(0, 1, pick_device(device_name))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), device)


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def agreed(elapsed: float, interrupted: bool, d: Dist) -> tuple[float, bool]:
    """(the largest rank's elapsed seconds, whether any rank saw Ctrl-C), the same on every rank:
    the learning rate follows the clock, and a rank that stopped a step later than the others, or
    took another rate, would wait for their gradients forever or drift from their weights."""
    if d.world == 1:
        return elapsed, interrupted
    t = torch.tensor([elapsed, float(interrupted)], dtype=torch.float64, device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t[0]), bool(t[1])


def cpuinfo(field: str) -> str | None:
    """The value of /proc/cpuinfo's first `field` line ("flags", "vendor_id", "model name"), or
    None where there is no such line or file (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == field:
                    return value.strip()
    except OSError:
        return None
    return None
