"""One training step of a dino_core preset: images/s, GPU-busy fraction, host syncs, launches, memory.

    python benchmarks/bench_step.py                              # H200: r50 4-scale, 800x1333, fp32/tf32/bf16 x batch 2/8
    python benchmarks/bench_step.py --device cpu --size 320 416 --batch 2 --modes fp32

A step is forward (bf16 autocast in ``bf16`` mode), criterion, backward and a fused AdamW update, on
a fixed synthetic batch with 12 boxes per image. Figures per mode and batch:

* ``img_s``: images per second over the timed steps (CUDA-synchronised wall time).
* ``gpu_busy``: GPU kernel time / wall time over profiled steps (CUDA only).
* ``host_syncs``: would-be blocking syncs of one step counted by ``dino_core.sync_audit`` (any
  device); on CUDA also ``cuda_syncs``, the synchronising calls CUDA's sync debug mode reports.
* ``launches``: CUDA kernels per step from the profiler; on CPU, dispatched aten ops per step.
* ``peak_gib``: peak allocated GPU memory (CUDA only).

Prints a Markdown table (for benchmarks/RESULTS.md) and, with ``--json``, writes the rows.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
import warnings

import torch

import dino_core
from dino_core.sync_audit import HostSyncAudit


def synthetic_batch(batch: int, h: int, w: int, boxes: int, device: str):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, h, w, generator=g).to(device)
    mask = torch.zeros(batch, h, w, dtype=torch.bool, device=device)
    targets = [{"labels": torch.randint(1, 91, (boxes,), generator=g).to(device),
                "boxes": torch.cat([torch.rand(boxes, 2, generator=g) * 0.5 + 0.25,
                                    torch.rand(boxes, 2, generator=g) * 0.2 + 0.05], 1).to(device)}
               for _ in range(batch)]
    return images, mask, targets


def make_step(preset: str, mode: str, batch: int, h: int, w: int, device: str, compile_layers: bool = False):
    torch.manual_seed(0)
    model, criterion, _ = dino_core.build_model(preset, num_classes=91)
    model.to(device).train()
    if compile_layers:
        dino_core.compile_transformer_layers(model)
    criterion.to(device)
    optimizer = torch.optim.AdamW(dino_core.param_groups(model), lr=1e-4, weight_decay=1e-4, fused=True)
    images, mask, targets = synthetic_batch(batch, h, w, 12, device)
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=mode == "bf16")

    def step():
        with autocast:
            outputs = model(images, mask, targets)
        losses = criterion(outputs, targets)
        criterion.total_loss(losses).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _cuda_sync_count(step) -> int:
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sum("synchronizing" in str(w.message) for w in caught)


def measure(preset: str, mode: str, batch: int, h: int, w: int, device: str, iters: int, warmup: int,
            compile_layers: bool = False) -> dict:
    cuda = device.startswith("cuda")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
        torch.backends.cudnn.allow_tf32 = mode == "tf32"
        torch.cuda.reset_peak_memory_stats()
    step = make_step(preset, mode, batch, h, w, device, compile_layers)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    with HostSyncAudit() as audit:
        step()
    row = {"preset": preset, "mode": mode + ("+compile" if compile_layers else ""), "batch": batch, "size": f"{h}x{w}", "device": device,
           "step_s": statistics.median(times), "img_s": batch / statistics.median(times),
           "host_syncs": audit.total_syncs, "sync_kinds": dict(audit.syncs), "aten_ops": audit.ops}
    if cuda:
        row["cuda_syncs"] = _cuda_sync_count(step)
        profiled = 3
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        sync()
        with torch.profiler.profile(activities=activities) as prof:
            start = time.perf_counter()
            for _ in range(profiled):
                step()
            sync()
            wall = time.perf_counter() - start
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy_us = sum(e.device_time for e in kernels)  # per-kernel time; kernels on one stream do not overlap
        row.update(gpu_busy=busy_us / 1e6 / wall, launches=len(kernels) / profiled,
                   peak_gib=torch.cuda.max_memory_allocated() / 2**30)
    else:
        row.update(gpu_busy=None, launches=audit.ops, peak_gib=None)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--preset", default="dino_r50_4scale")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--size", nargs=2, type=int, default=None, metavar=("H", "W"),
                        help="image size (default 800 1333 on CUDA, 320 416 on CPU)")
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default 2 8 on CUDA, 2 on CPU)")
    parser.add_argument("--modes", default=None, help="comma-separated fp32,tf32,bf16 (default all on CUDA, fp32 on CPU)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile each transformer layer "
                        "(dino_core.compile_transformer_layers); warm-up steps include the compilation")
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = parser.parse_args()
    on_cuda = args.device.startswith("cuda")
    h, w = args.size or ((800, 1333) if on_cuda else (320, 416))
    batches = args.batch or ([2, 8] if on_cuda else [2])
    modes = (args.modes or ("fp32,tf32,bf16" if on_cuda else "fp32")).split(",")
    device_name = torch.cuda.get_device_name() if on_cuda else f"CPU x{torch.get_num_threads()} threads"
    rows = []
    print("| preset | mode | batch x H x W | img/s | GPU busy | host syncs | launches/step | peak GiB | device | date |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode in modes:
        for batch in batches:
            r = measure(args.preset, mode, batch, h, w, args.device, args.iters, args.warmup, args.compile)
            rows.append(r)
            busy = "-" if r["gpu_busy"] is None else f"{r['gpu_busy']:.0%}"
            peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
            syncs = f"{r['host_syncs']}" + (f" ({r['cuda_syncs']} CUDA)" if "cuda_syncs" in r else "")
            print(f"| {r['preset']} | {r['mode']} | {batch}x{h}x{w} | {r['img_s']:.2f} | {busy} | {syncs} | "
                  f"{r['launches']:.0f} | {peak} | {device_name} | {datetime.date.today()} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
