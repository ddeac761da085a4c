"""Decode + augment throughput: Ray Data from an S3 endpoint vs a torch DataLoader on local files.

Both sides run the same per-image work (``transforms.make_sample``: decode, the DINO training
augmentation) and ``collate`` (normalisation, padding); what differs is where the bytes come from (Parquet
shards on S3 through Ray Data vs JPEG files on local disk) and who schedules the work.

    .venv/bin/python benchmarks/bench_data.py                       # 256 COCO-sized images, official scales
    .venv/bin/python benchmarks/bench_data.py --scale 0.4 --images 512
    .venv/bin/python benchmarks/bench_data.py --record              # also append a row to RESULTS.md
    .venv/bin/python benchmarks/bench_data.py --soak 100000 --record # augmentation soak: zero errors?

``--soak N`` renders N training samples (``make_sample``: a real JPEG decode, the plan, the
pixels) at the official scales (``--scale``, default 1.0: short side 480..800, max 1333) over
pictures of random COCO-like sizes (200-1000 px a side, plus thin and tiny ones), each image's
plan drawn from ``(seed, epoch, image_id)`` as in training, on ``--cpus`` processes, and counts
the samples that raise (there must be none) and the plans the old float geometry crashed on.

The S3 endpoint is moto's server on loopback unless AWS_ENDPOINT_URL is already set (then the
run uses that endpoint and the bucket named by --bucket, which must exist).
Reported per core: images/s divided by the CPUs each side was given; and images per CPU-second
(CPU time of this process and its descendants, Ray's included), which stays meaningful when other
jobs share the machine.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

import numpy as np  # noqa: E402


def _moto_endpoint():
    from moto.server import ThreadedMotoServer
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench-secret", AWS_REGION="us-east-1")
    return server


class LocalFiles:
    """torch Dataset over the synthetic JPEGs: the same sample code, bytes from local files."""

    def __init__(self, root: Path, cfg, seed: int):
        doc = json.loads((root / "annotations.json").read_text())
        by_image = {im["id"]: [] for im in doc["images"]}
        for ann in doc["annotations"]:
            by_image[ann["image_id"]].append(ann)
        self.items = [(root / "images" / im["file_name"], im, by_image[im["id"]]) for im in doc["images"]]
        self.cfg, self.seed = cfg, seed

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        from dino_platform.data.transforms import make_sample, sample_rng, sample_train_plan

        path, image, anns = self.items[index]
        plan = sample_train_plan(image["width"], image["height"], self.cfg, sample_rng(self.seed, 0, image["id"]))
        return make_sample(path.read_bytes(), image["width"], image["height"],
                           np.array([a["bbox"] for a in anns]).reshape(-1, 4), np.array([a["category_id"] for a in anns]),
                           np.array([a["iscrowd"] for a in anns]), image["id"], plan)


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and every live descendant (Ray's raylet, workers...)."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def bench_dataloader(root: Path, cfg, workers: int, batch_size: int) -> dict:
    import torch.utils.data

    from dino_platform.data.streaming import collate

    loader = torch.utils.data.DataLoader(LocalFiles(root, cfg, 0), batch_size=batch_size, num_workers=workers,
                                         collate_fn=collate, shuffle=True, persistent_workers=workers > 0)
    iterator = iter(loader)  # workers start here, outside the timed region
    count, start, cpu = 0, time.perf_counter(), _cpu_seconds()
    for images, _, targets in iterator:
        count += len(targets)
    wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    del iterator, loader
    return {"img_s": count / wall, "img_per_cpu_s": count / cpu}


def bench_ray(shards_uri: str, cfg, batch_size: int, passes: int, map_batch_size: int) -> list:
    from dino_platform.data.streaming import build_train_dataset, collate

    dataset = build_train_dataset(shards_uri, cfg, seed=0, batch_size=map_batch_size)
    results = []
    for _ in range(passes):
        count, start, cpu = 0, time.perf_counter(), _cpu_seconds()
        for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy"):
            count += len(collate(batch)[2])
        wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
        task_cpu = _task_cpu_seconds(dataset.stats())
        results.append({"img_s": count / wall, "img_per_cpu_s": count / cpu,
                        "img_per_task_cpu_s": count / task_cpu if task_cpu else float("nan")})
    return results


def _task_cpu_seconds(stats: str) -> float:
    """Sum of the "Remote cpu time ... total" of every operator in a Ray Data stats report: the CPU
    the pipeline's own tasks used, without Ray's daemons (which accrue CPU with wall time)."""
    import re

    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
    total = 0.0
    for line in stats.splitlines():
        if "Remote cpu time" in line:
            value, unit = re.search(r"([0-9.]+)(us|ms|s) total", line).groups()
            total += float(value) * units[unit]
    return total


def bench_decode_only(root: Path, limit: int = 200) -> float:
    from PIL import Image

    files = sorted((root / "images").glob("*.jpg"))[:limit]
    start = time.perf_counter()
    for path in files:
        with Image.open(path) as picture:
            picture.convert("RGB").load()
    return len(files) / (time.perf_counter() - start)


def bench_row_formats(root: Path, cfg, rows: int = 16, repeats: int = 4) -> dict:
    """CPU ms per image from a transformed uint8 sample to the model's input: uint8 rows (what the
    pipeline ships; collate normalises) vs float32 rows (normalised in the task): normalisation,
    the Arrow conversion map_batches does on output, the numpy conversion iter_batches does, and
    collate. Object-store copies, which scale with bytes too (4x for float32), are not included."""
    from ray.data.block import BlockAccessor

    from dino_platform.data.streaming import collate
    from dino_platform.data.transforms import normalize_into

    dataset = LocalFiles(root, cfg, 0)
    samples = [dataset[i] for i in range(min(rows, len(dataset)))]

    def as_float(batch_rows):  # the float32 design normalises in the task, before the conversion
        return [dict(s, image=normalize_into(np.empty(s["image"].shape, np.float32), s["image"])) for s in batch_rows]

    def to_model_input(batch_rows, float_rows: bool):
        batch_rows = as_float(batch_rows) if float_rows else batch_rows
        out = {k: [r[k] for r in batch_rows] for k in ("image", "labels", "boxes")}
        out.update({k: np.stack([r[k] for r in batch_rows]) for k in ("image_id", "orig_size", "size")})
        block = BlockAccessor.batch_to_block(out)
        return collate(BlockAccessor.for_block(block).to_batch_format("numpy"))

    timings = {"uint8": [], "float32": []}
    for _ in range(repeats):
        for name in ("uint8", "float32"):
            start = time.process_time()
            to_model_input(samples, float_rows=name == "float32")
            timings[name].append((time.process_time() - start) / len(samples) * 1000)
    return {name: round(min(values), 1) for name, values in timings.items()}


def _soak_pictures(count: int, seed: int):
    """(image_id, width, height, jpeg bytes, boxes xywh) of ``count`` synthetic pictures of random
    COCO-like sizes, with a few degenerate shapes (thin, tiny) among them."""
    import io

    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    pictures = []
    extremes = [(1, 1), (1, 300), (300, 1), (7, 5), (2000, 40), (40, 2000)]
    for index in range(count):
        width, height = extremes[index] if index < len(extremes) else (int(v) for v in rng.integers(200, 1001, 2))
        picture = Image.fromarray(rng.integers(0, 256, (max(1, height // 16), max(1, width // 16), 3), np.uint8)
                                  ).resize((width, height), Image.BILINEAR)
        boxes = []
        for _ in range(3):
            bw, bh = max(1, int(width * rng.uniform(0.1, 0.5))), max(1, int(height * rng.uniform(0.1, 0.5)))
            bx, by = int(rng.integers(0, width - bw + 1)), int(rng.integers(0, height - bh + 1))
            ImageDraw.Draw(picture).rectangle([bx, by, bx + bw - 1, by + bh - 1], outline=(255, 255, 255), width=2)
            boxes.append([bx, by, bw, bh])
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=90)
        pictures.append((1000 + index, width, height, buffer.getvalue(), np.array(boxes, np.float64)))
    return pictures


def _soak_chunk(args):
    """Render samples ``start..stop`` (sample k: picture k % P, epoch k // P); returns counts."""
    pictures, scale, seed, start, stop = args
    from dino_platform.data.transforms import TrainTransformConfig, make_sample, sample_rng, sample_train_plan

    cfg = TrainTransformConfig.scaled(scale) if scale != 1.0 else TrainTransformConfig()
    counts = {"samples": 0, "errors": 0, "crop": 0, "flip": 0, "old_geometry_crash": 0, "size_mismatch": 0}
    first_error = None
    for k in range(start, stop):
        image_id, width, height, data, boxes = pictures[k % len(pictures)]
        epoch = k // len(pictures)
        plan = None
        try:
            plan = sample_train_plan(width, height, cfg, sample_rng(seed, epoch, image_id))
            sample = make_sample(data, width, height, boxes, np.ones(len(boxes), np.int64), np.zeros(len(boxes), np.int64),
                                 image_id, plan)
            counts["size_mismatch"] += tuple(sample["image"].shape[2:0:-1]) != plan.out_size
        except Exception as exc:  # counted and reported: the soak's point
            counts["errors"] += 1
            first_error = first_error or f"image {image_id} ({width}x{height}) epoch {epoch} plan {plan}: {exc!r}"
            continue
        counts["samples"] += 1
        counts["crop"] += plan.crop is not None
        counts["flip"] += plan.flip
        if plan.crop is not None and plan.flip:  # the old mapping: far edge past width -> negative offset
            left, _, crop_width, _ = plan.crop
            counts["old_geometry_crash"] += width - (left + crop_width) * (width / plan.crop_resize[0]) < 0
    counts["first_error"] = first_error
    return counts


def soak(samples: int, scale: float, cpus: int, seed: int = 0, pictures: int = 500) -> dict:
    import multiprocessing

    pool_pictures = _soak_pictures(pictures, seed)
    chunk = 2000
    jobs = [(pool_pictures, scale, seed, start, min(samples, start + chunk)) for start in range(0, samples, chunk)]
    import resource

    def cpu_seconds():  # this process and its reaped children (the pool's workers, once closed)
        return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                   for f in ("ru_utime", "ru_stime"))

    cpu_before, started = cpu_seconds(), time.perf_counter()
    pool = multiprocessing.get_context("spawn").Pool(cpus)
    parts = pool.map(_soak_chunk, jobs, chunksize=1)
    pool.close()
    pool.join()
    wall = time.perf_counter() - started
    total = {key: sum(p[key] for p in parts) for key in parts[0] if key != "first_error"}
    total["first_error"] = next((p["first_error"] for p in parts if p["first_error"]), None)
    total.update(scale=scale, pictures=pictures, cpus=cpus, wall_s=round(wall, 1),
                 cpu_s=round(cpu_seconds() - cpu_before, 1), load_average_1min=round(os.getloadavg()[0], 1))
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, nargs=2, default=(640, 480), metavar=("W", "H"))
    parser.add_argument("--scale", type=float, default=1.0, help="transform size factor (1.0: official 480..800/1333)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs for Ray and DataLoader workers")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--passes", type=int, default=3, help="Ray passes; the best after the first is reported")
    parser.add_argument("--map-batch-size", type=int, default=16, help="rows per Ray Data decode task")
    parser.add_argument("--bucket", default="bench-data")
    parser.add_argument("--record", action="store_true", help="append the result to benchmarks/RESULTS.md")
    parser.add_argument("--soak", type=int, metavar="N", help="render N augmented samples, count errors (see above)")
    args = parser.parse_args()
    if args.soak:
        result = soak(args.soak, args.scale, args.cpus)
        print(json.dumps(result, indent=1))
        if args.record:
            line = (f"| data soak: {result['samples'] + result['errors']} training samples rendered (real JPEG decode, "
                    f"scale {args.scale}, {result['pictures']} pictures 200-1000 px + thin/tiny ones) | "
                    f"{platform.machine()} {os.cpu_count()} cores, {args.cpus} processes (load "
                    f"{result['load_average_1min']}) | {datetime.date.today()} | {result['errors']} errors, "
                    f"{result['size_mismatch']} size mismatches; {result['old_geometry_crash']} plans the old "
                    f"geometry crashed on; {result['cpu_s']} CPU-s ({result['wall_s']} s wall) |\n")
            with Path(__file__).with_name("RESULTS.md").open("a") as handle:
                handle.write(line)
        return 0 if result["errors"] == 0 and result["size_mismatch"] == 0 else 1

    import ray

    from dino_platform.data.ingest import IngestConfig, ingest
    from dino_platform.data.synth import SynthConfig, generate
    from dino_platform.data.transforms import TrainTransformConfig
    from dino_platform.storage import resolve

    cfg = TrainTransformConfig.scaled(args.scale) if args.scale != 1.0 else TrainTransformConfig()
    server = None if os.environ.get("AWS_ENDPOINT_URL") else _moto_endpoint()
    if server is not None:
        import boto3

        boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket=args.bucket)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "coco"
        generate(SynthConfig(kind="coco", images=args.images, seed=0, size=tuple(args.size)), str(root))
        shards = f"s3://{args.bucket}/bench/shards"
        ingest(IngestConfig("coco", str(root / "annotations.json"), str(root / "images"), shards,
                            shard_size=64, parallel=False))
        shard_bytes = sum(resolve(shards).child(n).size() for n in resolve(shards).list_files() if n.endswith(".parquet"))

        decode_only = bench_decode_only(root)
        row_formats = bench_row_formats(root, cfg)
        single = bench_dataloader(root, cfg, workers=0, batch_size=args.batch_size)
        multi = bench_dataloader(root, cfg, workers=args.cpus, batch_size=args.batch_size)

        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        rates = bench_ray(shards, cfg, args.batch_size, args.passes, args.map_batch_size)
        ray.shutdown()
    if server is not None:
        server.stop()

    best = max(rates[1:] or rates, key=lambda r: r["img_s"])
    result = {
        "images": args.images, "size": list(args.size), "scale": args.scale, "cpus": args.cpus,
        "map_batch_size": args.map_batch_size,
        "shard_mb": round(shard_bytes / 2 ** 20, 1),
        "pil_decode_only_img_s_1core": round(decode_only, 1),
        "dataloader_1process": {k: round(v, 1) for k, v in single.items()},
        f"dataloader_{args.cpus}workers": {k: round(v, 1) for k, v in multi.items()},
        "ray_s3_passes": [{k: round(v, 1) for k, v in r.items()} for r in rates],
        # per core: wall-clock rate / CPUs given; per CPU-second: robust when other jobs share the cores
        "ray_s3_img_s_per_core": round(best["img_s"] / args.cpus, 1),
        "dataloader_img_s_per_core": round(multi["img_s"] / args.cpus, 1),
        "ratio_per_core_wall": round(best["img_s"] / multi["img_s"], 2),
        "ratio_per_cpu_second_ray_vs_dataloader_1process": round(best["img_per_cpu_s"] / single["img_per_cpu_s"], 2),
        "ratio_per_task_cpu_second_ray_vs_dataloader_1process": round(best["img_per_task_cpu_s"] / single["img_per_cpu_s"], 2),
        "cpu_ms_per_image_sample_to_model_input": row_formats,
        "load_average_1min": round(os.getloadavg()[0], 1),
    }
    print(json.dumps(result, indent=1))
    if args.record:
        machine = f"{platform.machine()} {os.cpu_count()} cores (load {result['load_average_1min']})"
        line = (f"| data: decode+augment+collate (train transform, scale {args.scale}, {args.size[0]}x{args.size[1]} "
                f"JPEG, {args.images} img, {args.map_batch_size} rows/task), Ray Data from S3 (moto, loopback) vs torch DataLoader on local files, "
                f"{args.cpus} CPUs | {machine} | {datetime.date.today()} | per core (wall): Ray "
                f"{result['ray_s3_img_s_per_core']} vs DataLoader {result['dataloader_img_s_per_core']} img/s "
                f"(ratio {result['ratio_per_core_wall']}); per CPU-second: Ray {best['img_per_cpu_s']:.1f} vs "
                f"1-process DataLoader {single['img_per_cpu_s']:.1f} img (ratio "
                f"{result['ratio_per_cpu_second_ray_vs_dataloader_1process']}; Ray Data tasks alone "
                f"{best['img_per_task_cpu_s']:.1f} img/CPU-s); PIL decode only "
                f"{result['pil_decode_only_img_s_1core']} img/s; sample -> model input CPU ms/img: uint8 rows "
                f"{row_formats['uint8']} vs float32 rows {row_formats['float32']} |\n")
        path = Path(__file__).with_name("RESULTS.md")
        if not path.exists():
            path.write_text("# Benchmark results\n\n| what | device | date | figure |\n|---|---|---|---|\n")
        with path.open("a") as handle:
            handle.write(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
