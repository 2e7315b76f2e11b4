"""What this machine has: RAM (psutil), GPU memory (NVML when present), CPU load.

NVML comes from the optional `nvidia-ml-py` package (extra `gpu`); without it, or
without an NVIDIA driver, GPU figures are zero and `gpus` is empty. Figures are read
on demand (cheap: a few syscalls) by the status route and the gossip tick.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil


@dataclass
class Gpu:
    index: int
    name: str
    total: int
    free: int


@dataclass
class Resources:
    ram_total: int
    ram_free: int
    vram_total: int
    vram_free: int
    cpus: int
    load: float                       # 1-minute load average per CPU
    gpus: list[Gpu] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_nvml_state: dict[str, Any] = {}


def _gpus() -> list[Gpu]:
    if _nvml_state.get("broken"):
        return []
    try:
        import pynvml  # type: ignore[import-not-found]
        if not _nvml_state.get("init"):
            pynvml.nvmlInit()
            _nvml_state["init"] = True
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            name = pynvml.nvmlDeviceGetName(h)
            out.append(Gpu(i, name.decode() if isinstance(name, bytes) else name,
                           int(mem.total), int(mem.free)))
        return out
    except Exception:  # no package, no driver, no device: a CPU machine
        _nvml_state["broken"] = True
        return []


def read() -> Resources:
    vm = psutil.virtual_memory()
    gpus = _gpus()
    cpus = os.cpu_count() or 1
    return Resources(ram_total=int(vm.total), ram_free=int(vm.available),
                     vram_total=sum(g.total for g in gpus), vram_free=sum(g.free for g in gpus),
                     cpus=cpus, load=round(os.getloadavg()[0] / cpus, 3), gpus=gpus)
