"""Forward+backward (train step) and eval forward time of dino_core presets on the current device.

    python benchmarks/bench_model.py                         # dino_tiny @256 and dino_r50_4scale @320x416
    python benchmarks/bench_model.py --preset dino_tiny --size 256 256 --batch 2 --iters 10

Prints one Markdown table row per measurement (paste into benchmarks/RESULTS.md).
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch

import dino_core


def _targets(batch: int, n: int, generator: torch.Generator):
    return [{"labels": torch.randint(1, 80, (n,), generator=generator),
             "boxes": torch.cat([torch.rand(n, 2, generator=generator) * 0.5 + 0.25,
                                 torch.rand(n, 2, generator=generator) * 0.2 + 0.05], 1)} for _ in range(batch)]


def bench(preset: str, h: int, w: int, batch: int, iters: int, warmup: int, device: str) -> dict:
    torch.manual_seed(0)
    model, criterion, _ = dino_core.build_model(preset, num_classes=91)
    model.to(device)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, h, w, generator=g).to(device)
    mask = torch.zeros(batch, h, w, dtype=torch.bool, device=device)
    targets = [{k: v.to(device) for k, v in t.items()} for t in _targets(batch, 5, g)]
    params = [p for p in model.parameters() if p.requires_grad]

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def train_step():
        losses = criterion(model(images, mask, targets), targets)
        criterion.total_loss(losses).backward()
        for p in params:
            p.grad = None

    def timed(fn):
        """Median wall seconds and median CPU seconds (all threads) per call after warm-up."""
        wall, cpu = [], []
        for i in range(warmup + iters):
            sync(); t, c = time.perf_counter(), time.process_time(); fn(); sync()
            if i >= warmup:
                wall.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
        return statistics.median(wall), statistics.median(cpu)

    model.train()
    train_wall, train_cpu = timed(train_step)
    model.eval()
    with torch.no_grad():
        eval_wall, eval_cpu = timed(lambda: model(images, mask))
    return {"preset": preset, "size": f"{batch}x{h}x{w}", "train_s": train_wall, "train_cpu": train_cpu,
            "eval_s": eval_wall, "eval_cpu": eval_cpu, "impl": dino_core.selected_implementation(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", help="preset(s) to time (default: tiny and r50_4scale)")
    parser.add_argument("--size", nargs=2, type=int, default=None, metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    presets = args.preset or ["dino_tiny", "dino_r50_4scale"]
    default_sizes = {"dino_tiny": (256, 256), "dino_r50_4scale": (320, 416)}
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    # CPU seconds are the figure to compare on a shared machine: wall time depends on the load
    print("| preset | batch x H x W | train step wall s | train step CPU s | eval fwd wall s | eval fwd CPU s | MSDA impl | device | date |")
    print("|---|---|---|---|---|---|---|---|---|")
    for preset in presets:
        h, w = args.size or default_sizes.get(preset, (320, 416))
        r = bench(preset, h, w, args.batch, args.iters, args.warmup, args.device)
        print(f"| {r['preset']} | {r['size']} | {r['train_s']:.3f} | {r['train_cpu']:.3f} | {r['eval_s']:.3f} | "
              f"{r['eval_cpu']:.3f} | {r['impl']} | "
              f"{device_name} | {datetime.date.today()} |", flush=True)


if __name__ == "__main__":
    main()
