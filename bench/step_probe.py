"""Run a training script unchanged and record when each optimizer step ends, and the process's peak memory.

`python bench/step_probe.py OUT.json SCRIPT.py ARGS...` (or `MODULE:FUNCTION ARGS...`, e.g.
`tuner.cli:main train ...`) runs the script as `__main__` with a global optimizer-step hook
(`register_optimizer_step_post_hook`), so our loop and a peer's example script are timed the same way without
touching either: the time between consecutive optimizer steps is one training step (data, forward, backward,
optimizer). At exit it writes the step end times, the peak RSS (`ru_maxrss`) and, on CUDA, the peak allocated
GPU memory.
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import resource
import runpy
import sys
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook


def main() -> None:
    out, target, *rest = sys.argv[1:]
    ends: list[float] = []
    cpu: list[float] = []  # this process's CPU time: on a shared machine, the work without the waiting
    rss: list[int] = []
    page = os.sysconf("SC_PAGE_SIZE")

    def record(optimizer, args, kwargs) -> None:
        if not getattr(optimizer, "_fused_inner", False):  # a fused-backward run's per-parameter steps
            ends.append(time.perf_counter())
            cpu.append(time.process_time())
            with open("/proc/self/statm", encoding="ascii") as statm:
                rss.append(int(statm.read().split()[1]) * page)

    def write() -> None:
        result = {
            "step_ends": ends,
            "cpu_at_steps": cpu,
            "rss_at_steps": rss,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "cuda_peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        }
        with open(out, "w", encoding="utf-8") as f:
            json.dump(result, f)

    atexit.register(write)
    register_optimizer_step_post_hook(record)
    if ":" in target and not Path(target).exists():  # an entry point, e.g. tuner.cli:main
        module, function = target.split(":")
        sys.argv = [module, *rest]
        code = getattr(importlib.import_module(module), function)(rest)
        sys.exit(code or 0)
    else:
        sys.argv = [target, *rest]
        sys.path.insert(0, str(Path(target).resolve().parent))
        runpy.run_path(target, run_name="__main__")


if __name__ == "__main__":
    main()
