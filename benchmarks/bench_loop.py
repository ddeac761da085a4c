"""The training loop's own overhead: `dino train` against the bare model step on the same batches.

    python benchmarks/bench_loop.py                       # CPU: dino_tiny, 1 worker, batch 2, 48 steps
    python benchmarks/bench_loop.py --gpu --preset dino_r50_4scale --scale 1.0 --precision bf16

1. Synthetic COCO-like pictures are ingested to local shards.
2. ``run_training`` trains on them (Ray Train, DeepSpeed, Ray Data, the real loop) with one worker;
   the images/s of its last report window (after ``--warmup`` steps) is the loop's figure.
3. The same preset, batch size and precision then run the bare step (forward, criterion, backward,
   fused AdamW, no Ray, no DeepSpeed) on the first batches of the very same augmented data path,
   collated in advance; its images/s is the model's figure.

The ratio loop / bare is what the loop keeps of the model's speed (issue goal: >= 0.9 on a GPU).
Run it on a quiet machine: both figures are wall times.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def loop_throughput(args, shards: str, workdir: Path) -> dict:
    from dino_platform.train.config import load_config
    from dino_platform.train.trainer import run_training

    cfg = load_config({
        "data": {"train_uri": shards, "transform": {"scale": args.scale}},
        "model": {"preset": args.preset, "num_classes": 91},
        "optim": {"epochs": 1000, "max_steps": args.steps},
        "scaling": {"num_workers": 1, "batch_size_per_worker": args.batch, "use_gpu": args.gpu,
                    "cpus_per_worker": args.cpus_per_worker},
        "deepspeed": {"zero_stage": args.zero, "precision": args.precision},
        "checkpoint": {"every_n_epochs": 1000, "num_to_keep": None},
        "run": {"name": "bench-loop", "storage_path": str(workdir / "runs"), "seed": 0},
        "tracking": {"log_every_n_steps": args.warmup, "tracking_uri": None},
    })
    started = time.perf_counter()
    outcome = run_training(cfg)
    if outcome.error is not None:
        raise outcome.error
    return {"images_per_s": outcome.metrics["images_per_s"], "data_wait": outcome.metrics["data_wait_fraction"],
            "job_s": time.perf_counter() - started}


def bare_throughput(args, shards: str) -> dict:
    import dino_core
    from dino_platform.data.streaming import build_train_dataset
    from dino_platform.data.transforms import transform_configs
    from dino_platform.data.batches import iter_collated

    device = "cuda" if args.gpu else "cpu"
    if not args.gpu:  # as many threads as the loop's worker: Ray gives a worker of < 2 CPUs one
        torch.set_num_threads(max(1, int(args.cpus_per_worker)))
    train_transform, _ = transform_configs({"scale": args.scale})
    dataset = build_train_dataset(shards, {"scale": args.scale}, 0)
    batches = []
    for batch in iter_collated(dataset, args.batch, True, (train_transform.mean, train_transform.std)):
        images, mask, targets = batch
        batches.append((images.to(device), mask.to(device),
                        [{k: v.to(device) for k, v in t.items() if isinstance(v, torch.Tensor)} for t in targets]))
        if len(batches) == args.steps:
            break
    torch.manual_seed(0)
    model, criterion, _ = dino_core.build_model(args.preset, num_classes=91)
    model.to(device).train()
    optimizer = torch.optim.AdamW(dino_core.param_groups(model), lr=1e-4, weight_decay=1e-4, fused=True)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    sync = torch.cuda.synchronize if args.gpu else (lambda: None)
    times = []
    for i, (images, mask, targets) in enumerate(batches):
        sync()
        start = time.perf_counter()
        with autocast:
            outputs = model(images, mask, targets)
        criterion.total_loss(criterion(outputs, targets)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return {"images_per_s": args.batch * len(times) / sum(times), "median_step_s": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="dino_tiny")
    parser.add_argument("--images", type=int, default=200, help="synthetic training pictures")
    parser.add_argument("--size", nargs=2, type=int, default=(320, 240), metavar=("W", "H"))
    parser.add_argument("--scale", type=float, default=0.3, help="data.transform.scale (1.0: official 800-1333 px)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--warmup", type=int, default=8, help="steps left out of both figures")
    parser.add_argument("--zero", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--cpus-per-worker", type=float, default=0.5, help="scaling.cpus_per_worker; on CPU the "
                        "bare step runs with as many torch threads as Ray gives that worker")
    args = parser.parse_args()
    import ray

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from support.shards import synthetic_shards

    with tempfile.TemporaryDirectory(prefix="bench-loop-") as tmp:
        workdir = Path(tmp)
        shards = synthetic_shards(workdir, images=args.images, seed=1, size=args.size)
        ray.init(include_dashboard=True, log_to_driver=False)
        loop = loop_throughput(args, shards, workdir)
        bare = bare_throughput(args, shards)
        ray.shutdown()
    load = os.getloadavg()[0]
    device = torch.cuda.get_device_name() if args.gpu else f"CPU x{os.cpu_count()}"
    print("| preset | batch | precision | ZeRO | loop img/s | loop's data wait | bare step img/s | loop / bare | device | load | date |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.preset} (scale {args.scale}) | {args.batch} | {args.precision} | {args.zero} | "
          f"{loop['images_per_s']:.2f} | {loop['data_wait']:.0%} | {bare['images_per_s']:.2f} | {loop['images_per_s'] / bare['images_per_s']:.2f} | "
          f"{device} | {load:.1f} | {datetime.date.today()} |")


if __name__ == "__main__":
    main()
