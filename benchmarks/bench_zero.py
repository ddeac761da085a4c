"""Train-step throughput and per-rank optimizer/gradient memory: DDP vs DeepSpeed ZeRO-1/2/3.

Runs each mode as a 2-worker Ray Train job (gloo on CPU, NCCL with --gpu) on the same in-memory
batches (no data loading: this measures the training step), dino_tiny by default.

    .venv/bin/python benchmarks/bench_zero.py                      # CPU, 2 workers, all modes
    .venv/bin/python benchmarks/bench_zero.py --modes ddp zero2 --steps 10 --size 160

Memory per rank, from the tensors themselves (not allocator statistics):
  optimizer state   Adam moments held by the rank's optimizer, plus the fp32 partitions DeepSpeed
                    steps on when they are copies rather than the model's own parameters
  gradients         the larger of: gradients left on the model's parameters after backward, and
                    the gradient partitions the optimizer steps on. DeepSpeed reduces gradients
                    through its own buckets during backward; those transient buffers are not
                    counted here (peak RSS includes them)
  peak RSS          the worker process's peak resident set (includes model, activations, runtime)
Appends one row per mode to benchmarks/RESULTS.md with --record.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

MODES = ("ddp", "zero1", "zero2", "zero3")


def _tensor_bytes(obj) -> int:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _synthetic_batches(count: int, batch: int, size: int, rank: int):
    import torch

    generator = torch.Generator().manual_seed(1000 + rank)
    batches = []
    for _ in range(count):
        images = torch.randn(batch, 3, size, size, generator=generator)
        mask = torch.zeros(batch, size, size, dtype=torch.bool)
        targets = []
        for _ in range(batch):
            n = int(torch.randint(1, 6, (1,), generator=generator))
            centers = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
            sizes = torch.rand(n, 2, generator=generator) * 0.3 + 0.05
            targets.append({"labels": torch.randint(1, 91, (n,), generator=generator),
                            "boxes": torch.cat([centers, sizes], 1)})
        batches.append((images, mask, targets))
    return batches


def bench_worker(config: dict) -> None:
    import ray.train
    import torch
    import torch.distributed as dist

    import dino_core
    from dino_platform.train.config import load_config
    from dino_platform.train.engine import build_engine

    mode = config["mode"]
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(0)
    model, criterion, _ = dino_core.build_model(config["preset"], num_classes=91)
    batches = _synthetic_batches(config["warmup"] + config["steps"], config["batch"], config["size"], rank)
    grad_on_params, grad_in_partitions, masters = [0], [0], [0]

    if mode == "ddp":
        model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})
        optimizer = torch.optim.AdamW(dino_core.param_groups(model.module, lr=1e-4, lr_backbone=1e-5),
                                      lr=1e-4, weight_decay=1e-4)

        def step(images, mask, targets):
            losses = criterion(model(images, mask, targets), targets)
            criterion.total_loss(losses).backward()
            grad_on_params[0] = max(grad_on_params[0], sum(_tensor_bytes(p.grad) for p in model.parameters()))
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        inner = optimizer
    else:
        cfg = load_config({"data": {"train_uri": "unused"}, "deepspeed": {"zero_stage": int(mode[-1])},
                           "scaling": {"num_workers": 2, "batch_size_per_worker": config["batch"],
                                       "use_gpu": config["gpu"]}})
        engine, _ = build_engine(model, cfg)
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        own_params = {id(p) for p in engine.module.parameters()}
        original_step = inner.step

        def recording_step(*args, **kwargs):
            # ZeRO-3 puts its fp32 partitions into the param groups only for the step itself
            stepped = [p for g in inner.param_groups for p in g["params"]]
            grad_in_partitions[0] = max(grad_in_partitions[0], sum(_tensor_bytes(p.grad) for p in stepped))
            masters[0] = max(masters[0], sum(_tensor_bytes(p) for p in stepped if id(p) not in own_params))
            return original_step(*args, **kwargs)

        inner.step = recording_step

        def step(images, mask, targets):
            losses = criterion(engine(images, mask, targets), targets)
            engine.backward(criterion.total_loss(losses))
            grad_on_params[0] = max(grad_on_params[0],
                                    sum(_tensor_bytes(p.grad) for p in engine.module.parameters()))
            engine.step()

    device = ray.train.torch.get_device()
    for i, (images, mask, targets) in enumerate(batches):
        if i == config["warmup"]:
            dist.barrier()
            started = time.perf_counter()
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        step(images.to(device), mask.to(device), targets)
    dist.barrier()
    elapsed = time.perf_counter() - started

    mine = {
        "rank": rank,
        "optimizer_state_mb": (_tensor_bytes(list(inner.state.values())) + masters[0]) / 2**20,
        "gradients_mb": max(grad_on_params[0], grad_in_partitions[0]) / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    steps_per_s = config["steps"] / elapsed
    metrics = {"mode": mode, "steps_per_s": steps_per_s,
               "images_per_s": steps_per_s * config["batch"] * dist.get_world_size(), "ranks": everyone}
    with tempfile.TemporaryDirectory() as directory:
        Path(directory, "bench.json").write_text(json.dumps(metrics))
        ray.train.report({"result": json.dumps(metrics)},
                         checkpoint=ray.train.Checkpoint.from_directory(directory) if rank == 0 else None)


def run_mode(mode: str, args) -> dict:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    with tempfile.TemporaryDirectory(prefix="bench-zero-") as storage:
        trainer = TorchTrainer(
            bench_worker,
            train_loop_config={"mode": mode, "preset": args.preset, "batch": args.batch, "size": args.size,
                               "warmup": args.warmup, "steps": args.steps, "gpu": args.gpu},
            scaling_config=ray.train.ScalingConfig(num_workers=args.workers, use_gpu=args.gpu,
                                                   resources_per_worker={"CPU": args.cpus_per_worker}),
            torch_config=TorchConfig(backend="nccl" if args.gpu else "gloo"),
            run_config=ray.train.RunConfig(name=f"bench-{mode}", storage_path=storage),
        )
        return json.loads(trainer.fit().metrics["result"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--preset", default="dino_tiny")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=2, help="images per worker per step")
    parser.add_argument("--size", type=int, default=128, help="square image side in pixels")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--record", action="store_true", help="append the rows to benchmarks/RESULTS.md")
    args = parser.parse_args()

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=max(2, int(args.workers * args.cpus_per_worker)), include_dashboard=False)
    load_before = os.getloadavg()[0]
    rows = []
    try:
        for mode in args.modes:
            started = time.perf_counter()
            result = run_mode(mode, args)
            result["wall_s"] = time.perf_counter() - started
            rows.append(result)
            print(json.dumps(result))
    finally:
        ray.shutdown()
    table = _markdown(rows, args, (load_before, os.getloadavg()[0]))
    print(table)
    if args.record:
        _append(table)


def _markdown(rows, args, load) -> str:
    device = "GPU" if args.gpu else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    lines = [f"\n### bench_zero.py — {datetime.date.today()} — {device}, {args.workers} workers, {args.preset}, "
             f"batch {args.batch}/worker, {args.size}x{args.size}, {args.steps} timed steps after {args.warmup} warm-up; "
             f"host load average {load[0]:.1f} at start, {load[1]:.1f} at end\n",
             "| mode | steps/s | images/s | optimizer state MB/rank | gradients MB/rank | peak RSS MB/rank | job wall s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ranks = sorted(r["ranks"], key=lambda x: x["rank"])
        per = lambda key: " / ".join(f"{x[key]:.1f}" for x in ranks)  # noqa: E731
        lines.append(f"| {r['mode']} | {r['steps_per_s']:.3f} | {r['images_per_s']:.2f} | {per('optimizer_state_mb')} | "
                     f"{per('gradients_mb')} | {per('peak_rss_mb')} | {r['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def _append(table: str) -> None:
    path = Path(__file__).with_name("RESULTS.md")
    if not path.exists():
        path.write_text("# Benchmark results\n\nRows are appended by the scripts in this folder (`--record`).\n")
    with path.open("a") as handle:
        handle.write(table)


if __name__ == "__main__":
    main()
