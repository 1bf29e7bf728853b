"""Where a training step's time goes on a GPU: kernel time, launches, and how busy the GPU is.

    python train.py trainer=gpu +callbacks.kernel_profile._target_=models.KernelProfile \
        +callbacks.kernel_profile.path=kernel_profile.json ...

A step whose wall time far exceeds its kernel time is bound by the host (Python, kernel launches),
not by the GPU; CUDA graphs (compile=reduce-overhead) remove most launches.
"""

import json
import time
from pathlib import Path

import lightning as L
import torch

# Host calls that put work on the GPU: a CUDA graph's replay counts as one.
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch",
            "cudaMemcpyAsync", "cudaMemsetAsync")


def busy_time_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals: time the GPU ran anything, overlaps counted once."""
    busy, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return busy


def kernel_summary(prof, steps: int) -> tuple[dict, list[dict]]:
    """Per step of a torch.profiler run over `steps` steps: {"kernel_ms" (summed kernel, copy and memset
    time), "gpu_busy_ms" (their union), "kernels", "launches" (host calls that queue GPU work)}, and
    every kernel's {"name", "calls", "ms"} per step, most time first."""
    from torch.autograd import DeviceType

    totals: dict[str, list] = {}
    intervals, launches = [], 0
    for event in prof.events():
        if event.device_type == DeviceType.CUDA and not event.is_user_annotation:
            calls_and_us = totals.setdefault(event.name, [0, 0.0])
            calls_and_us[0] += 1
            calls_and_us[1] += event.time_range.elapsed_us()
            intervals.append((event.time_range.start, event.time_range.end))
        elif event.name in LAUNCHES:
            launches += 1
    summary = {"kernel_ms": sum(us for _, us in totals.values()) / steps / 1e3,
               "gpu_busy_ms": busy_time_us(intervals) / steps / 1e3,
               "kernels": sum(calls for calls, _ in totals.values()) / steps, "launches": launches / steps}
    kernels = [{"name": name, "calls": calls / steps, "ms": us / steps / 1e3}
               for name, (calls, us) in sorted(totals.items(), key=lambda item: -item[1][1])]
    return summary, kernels


def host_summary(prof, steps: int) -> list[dict]:
    """The host's time per step by operator and, when profiled with_stack, Python function: every name's
    {"name", "calls", "self_ms" (its own time), "total_ms" (with what it calls)} per step, most self time first."""
    from torch.autograd import DeviceType

    totals: dict[str, list] = {}
    for event in prof.events():
        if event.device_type == DeviceType.CPU:
            calls_self_total = totals.setdefault(event.name, [0, 0.0, 0.0])
            calls_self_total[0] += 1
            calls_self_total[1] += event.self_cpu_time_total
            calls_self_total[2] += event.cpu_time_total
    return [{"name": name, "calls": calls / steps, "self_ms": own / steps / 1e3, "total_ms": total / steps / 1e3}
            for name, (calls, own, total) in sorted(totals.items(), key=lambda item: -item[1][1])]


def profile_calls(step, calls: int = 3) -> tuple[dict, list[dict]]:
    """kernel_summary of `calls` calls of `step` (after its warm-up) on the GPU."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    return kernel_summary(prof, calls)


def kernel_table(kernels: list[dict], total_ms: float, top: int = 15) -> str:
    """Markdown table of the `top` kernels with the most GPU time per step."""
    lines = ["| kernel | calls per step | ms per step | share of GPU time |", "|---|---:|---:|---:|"]
    lines += [f"| `{k['name'][:90].replace('|', '/')}` | {k['calls']:g} | {k['ms']:.3f} | {k['ms'] / total_ms:.1%} |"
              for k in kernels[:top]]
    return "\n".join(lines)


def host_table(functions: list[dict], top: int = 25) -> str:
    """Markdown table of the `top` host functions and operators with the most own time per step."""
    lines = ["| host function or operator | calls per step | own ms per step | ms with callees |", "|---|---:|---:|---:|"]
    lines += [f"| `{f['name'][:100].replace('|', '/')}` | {f['calls']:g} | {f['self_ms']:.3f} | {f['total_ms']:.3f} |"
              for f in functions[:top]]
    return "\n".join(lines)


class KernelProfile(L.Callback):
    """Profiles training steps start_step+1 .. start_step+steps (torch.profiler, CPU and CUDA) and writes
    `path` (JSON: the per-step summary of `kernel_summary`, the wall time per step while profiled, and
    every kernel) and the same path with .md (the top kernels). The profiler slows the host, so the wall
    time it reports is an upper bound; the GPU's busy fraction is its busy time over the unprofiled
    step time (train/tokens_per_s). `trace`: also the timeline, for chrome://tracing or Perfetto, beside
    `path` as .trace.json.gz. `host`: also record Python stacks (with_stack) and add the host's time per
    operator and, where the profiler's Python tracer reports them, per Python function to both files:
    where a step bound by the host spends it (the tracer slows the host further, so compare entries,
    not wall times). On the H200 image (torch 2.11) the table held operators and record_function
    ranges only. Does nothing on a CPU."""

    def __init__(self, path: str, start_step: int = 20, steps: int = 5, trace: bool = False, host: bool = False):
        self.path, self.start_step, self.steps, self.trace, self.host = Path(path), start_step, steps, trace, host
        self._profiler, self._started = None, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.device.type == "cuda" and trainer.global_step == self.start_step and self._profiler is None:
            from torch.profiler import ProfilerActivity, profile

            torch.cuda.synchronize()
            self._profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=self.host)
            self._profiler.__enter__()
            self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._profiler is None or trainer.global_step < self.start_step + self.steps or not self._started:
            return
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - self._started) / self.steps * 1e3
        self._profiler.__exit__(None, None, None)
        self._started = 0.0  # profiled once
        summary, kernels = kernel_summary(self._profiler, self.steps)
        summary = {"steps": [self.start_step + 1, self.start_step + self.steps], "profiled_wall_ms": wall_ms,
                   **summary}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.trace:
            self._profiler.export_chrome_trace(str(self.path.with_suffix(".trace.json.gz")))
        host = host_summary(self._profiler, self.steps) if self.host else []
        self.path.write_text(json.dumps({"summary": summary, "kernels": kernels, "host": host}, indent=2) + "\n")
        self.path.with_suffix(".md").write_text(
            f"Steps {self.start_step + 1}-{self.start_step + self.steps}: {wall_ms:.2f} ms per step (profiled), "
            f"{summary['kernel_ms']:.2f} ms of kernels ({summary['gpu_busy_ms']:.2f} ms busy), "
            f"{summary['kernels']:,.0f} kernels and {summary['launches']:,.0f} launches per step\n\n"
            + kernel_table(kernels, summary["kernel_ms"]) + "\n" + (f"\n{host_table(host)}\n" if host else ""))
