"""Decode + augment throughput: Ray Data from an S3 endpoint vs a torch DataLoader on local files.

Both sides run the same per-image work (``transforms.make_sample``: decode, the DINO training
augmentation, normalisation) and ``collate``; what differs is where the bytes come from (Parquet
shards on S3 through Ray Data vs JPEG files on local disk) and who schedules the work.

    .venv/bin/python benchmarks/bench_data.py                       # 256 COCO-sized images, official scales
    .venv/bin/python benchmarks/bench_data.py --scale 0.4 --images 512
    .venv/bin/python benchmarks/bench_data.py --record              # also append a row to RESULTS.md

The S3 endpoint is moto's server on loopback unless AWS_ENDPOINT_URL is already set (then the
run uses that endpoint and the bucket named by --bucket, which must exist).
Reported per core: images/s divided by the CPUs each side was given.
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
                           np.array([a["iscrowd"] for a in anns]), image["id"], plan, self.cfg.mean, self.cfg.std)


def bench_dataloader(root: Path, cfg, workers: int, batch_size: int) -> float:
    import torch.utils.data

    from dino_platform.data.streaming import collate

    loader = torch.utils.data.DataLoader(LocalFiles(root, cfg, 0), batch_size=batch_size, num_workers=workers,
                                         collate_fn=collate, shuffle=True)
    count, start = 0, time.perf_counter()
    for images, _, targets in loader:
        count += len(targets)
    return count / (time.perf_counter() - start)


def bench_ray(shards_uri: str, cfg, batch_size: int, passes: int) -> list:
    from dino_platform.data.streaming import build_train_dataset, collate

    dataset = build_train_dataset(shards_uri, cfg, seed=0)
    rates = []
    for _ in range(passes):
        count, start = 0, time.perf_counter()
        for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy"):
            count += len(collate(batch)[2])
        rates.append(count / (time.perf_counter() - start))
    return rates


def bench_decode_only(root: Path, limit: int = 200) -> float:
    from PIL import Image

    files = sorted((root / "images").glob("*.jpg"))[:limit]
    start = time.perf_counter()
    for path in files:
        with Image.open(path) as picture:
            picture.convert("RGB").load()
    return len(files) / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, nargs=2, default=(640, 480), metavar=("W", "H"))
    parser.add_argument("--scale", type=float, default=1.0, help="transform size factor (1.0: official 480..800/1333)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs for Ray and DataLoader workers")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--passes", type=int, default=3, help="Ray passes; the best after the first is reported")
    parser.add_argument("--bucket", default="bench-data")
    parser.add_argument("--record", action="store_true", help="append the result to benchmarks/RESULTS.md")
    args = parser.parse_args()

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
        single = bench_dataloader(root, cfg, workers=0, batch_size=args.batch_size)
        multi = bench_dataloader(root, cfg, workers=args.cpus, batch_size=args.batch_size) if args.cpus > 1 else single

        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        rates = bench_ray(shards, cfg, args.batch_size, args.passes)
        ray.shutdown()
    if server is not None:
        server.stop()

    ray_rate = max(rates[1:] or rates)
    result = {
        "images": args.images, "size": list(args.size), "scale": args.scale, "cpus": args.cpus,
        "shard_mb": round(shard_bytes / 2 ** 20, 1),
        "pil_decode_only_img_s_1core": round(decode_only, 1),
        "dataloader_img_s_1core": round(single, 1),
        f"dataloader_img_s_{args.cpus}workers": round(multi, 1),
        "ray_s3_img_s_per_pass": [round(r, 1) for r in rates],
        "ray_s3_img_s_per_core": round(ray_rate / args.cpus, 1),
        "dataloader_img_s_per_core": round(multi / args.cpus, 1),
        "ratio_ray_per_core_vs_dataloader_per_core": round((ray_rate / args.cpus) / (multi / args.cpus), 2),
        "ratio_ray_per_core_vs_single_process": round((ray_rate / args.cpus) / single, 2),
        "load_average_1min": round(os.getloadavg()[0], 1),
    }
    print(json.dumps(result, indent=1))
    if args.record:
        machine = f"{platform.machine()} {os.cpu_count()} cores (load {result['load_average_1min']})"
        line = (f"| data: decode+augment (train, scale {args.scale}, {args.size[0]}x{args.size[1]} JPEG, "
                f"{args.images} img), Ray Data from S3 (moto) vs torch DataLoader local files, {args.cpus} CPUs "
                f"| {machine} | {datetime.date.today()} | Ray {result['ray_s3_img_s_per_core']} img/s/core vs "
                f"DataLoader {result['dataloader_img_s_per_core']} img/s/core (ratio "
                f"{result['ratio_ray_per_core_vs_dataloader_per_core']}); 1 process "
                f"{result['dataloader_img_s_1core']} img/s; PIL decode only {result['pil_decode_only_img_s_1core']} img/s |\n")
        path = Path(__file__).with_name("RESULTS.md")
        if not path.exists():
            path.write_text("# Benchmark results\n\n| what | device | date | figure |\n|---|---|---|---|\n")
        with path.open("a") as handle:
            handle.write(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
