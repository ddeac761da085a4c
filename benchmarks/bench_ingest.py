"""Driver peak RSS and wall time of ``dino ingest`` on Objects365-v2-shaped synthetic sets.

Objects365 v2 train at 100%: 1,742,200 images and 24,518,800 boxes in one JSON, images under
``patch0/`` .. ``patch50/``, annotations in random image order. A set at scale ``s`` has
``s`` times as many images and boxes (Poisson number of boxes per image, mean 14.07), the records
carry Objects365's fields (``license``, ``url``, ``isfake``, ``isreflected``), and the JPEGs are
tiny (a few KB) so that the figure measured is the driver's bookkeeping, not image decoding.

    python benchmarks/bench_ingest.py --scales 0.01 0.05 0.2            # generate (once) + measure
    python benchmarks/bench_ingest.py --scales 0.01 --code /tmp/old     # another checkout's ingest
    python benchmarks/bench_ingest.py --scales 0.01 0.05 --record       # append rows to RESULTS.md

Sets are generated under ``--root`` (default /tmp/o365_bench; never inside the repository) and
reused by later runs. Each ingest runs in a fresh driver process (``--code`` puts another
checkout's ``platform/`` first on its path, e.g. ``git archive <rev> platform | tar -x -C /tmp/old``);
Ray is started in that process first (a local instance, 2 CPUs; not timed) and
that process reports its own peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``): the driver only,
not the Ray workers or raylet it starts. The growth per million images is the least-squares slope
of peak RSS over the image count.
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

FULL_IMAGES, FULL_BOXES, PATCHES = 1_742_200, 24_518_800, 51
SIZES = [(32, 24), (24, 32), (40, 30), (28, 28)]  # tiny JPEGs; one encoded file per size

DRIVER = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import ray
from dino_platform.data.ingest import IngestConfig, ingest
for attempt in range(3):  # a loaded machine can miss Ray's start-up deadline
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        break
    except Exception:
        if attempt == 2:
            raise
        ray.shutdown()
start = time.perf_counter()
manifest = ingest(IngestConfig("o365", sys.argv[2], sys.argv[3], sys.argv[4], shard_size=512, parallel=True))
wall = time.perf_counter() - start
print("RESULT " + json.dumps({"wall_s": wall, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                              "images": manifest.images, "annotations": manifest.annotations,
                              "quarantined": len(manifest.quarantined), "digest": manifest.digest}))
"""


def _jpegs() -> dict:
    from PIL import Image

    encoded = {}
    for k, (w, h) in enumerate(SIZES):
        buffer = io.BytesIO()
        Image.new("RGB", (w, h), (40 * k, 90, 160)).save(buffer, format="JPEG", quality=80)
        encoded[(w, h)] = buffer.getvalue()
    return encoded


def generate(root: Path, scale: float, seed: int = 0) -> dict:
    """Write an Objects365-v2-shaped set at ``root`` (skipped if it is complete); return its counts."""
    done = root / "COMPLETE.json"
    if done.exists():
        return json.loads(done.read_text())
    rng = np.random.default_rng(seed)
    n_images = int(round(FULL_IMAGES * scale))
    boxes_per_image = rng.poisson(FULL_BOXES / FULL_IMAGES, n_images)
    jpegs = _jpegs()
    sizes = rng.integers(0, len(SIZES), n_images)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images = []
    for k in range(n_images):
        image_id = k + 1
        patch = k * PATCHES // n_images
        w, h = SIZES[sizes[k]]
        name = f"patch{patch}/objects365_v2_{image_id:08d}.jpg"
        path = root / "images" / name
        if k == 0 or patch != (k - 1) * PATCHES // n_images:
            path.parent.mkdir(exist_ok=True)
        path.write_bytes(jpegs[(w, h)])
        images.append({"height": h, "id": image_id, "license": 5, "width": w,
                       "file_name": f"images/v2/{name}", "url": ""})
    owner = np.repeat(np.arange(n_images), boxes_per_image)
    rng.shuffle(owner)  # annotations in random image order, as in the real file
    n_boxes = len(owner)
    widths = np.array([SIZES[s][0] for s in sizes], dtype=np.float64)[owner]
    heights = np.array([SIZES[s][1] for s in sizes], dtype=np.float64)[owner]
    x = np.round(rng.uniform(-1, 0.8, n_boxes) * widths, 4)
    y = np.round(rng.uniform(-1, 0.8, n_boxes) * heights, 4)
    bw = np.round(rng.uniform(0.05, 0.6, n_boxes) * widths + np.maximum(-x, 0), 4)
    bh = np.round(rng.uniform(0.05, 0.6, n_boxes) * heights + np.maximum(-y, 0), 4)
    categories = rng.integers(1, 366, n_boxes)
    with open(root / "annotations.json", "w") as handle:
        handle.write('{"images": [')
        handle.write(", ".join(json.dumps(r) for r in images))
        handle.write('], "annotations": [')
        for start in range(0, n_boxes, 100_000):
            stop = min(n_boxes, start + 100_000)
            handle.write((", " if start else "") + ", ".join(
                json.dumps({"id": j + 1, "iscrowd": 0, "isfake": 0, "area": float(bw[j] * bh[j]),
                            "isreflected": 0, "bbox": [float(x[j]), float(y[j]), float(bw[j]), float(bh[j])],
                            "image_id": int(owner[j]) + 1, "category_id": int(categories[j])})
                for j in range(start, stop)))
        handle.write('], "categories": [')
        handle.write(", ".join(json.dumps({"name": f"class {c}", "id": c}) for c in range(1, 366)))
        handle.write("]}")
    counts = {"scale": scale, "images": n_images, "boxes": int(n_boxes),
              "json_bytes": (root / "annotations.json").stat().st_size}
    done.write_text(json.dumps(counts))
    return counts


def measure(root: Path, code: Path, out: Path) -> dict:
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_raylet_start_wait_time_s="120", PYTHONPATH=f"{code / 'platform'}{os.pathsep}"
               + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(code / "platform"), str(root / "annotations.json"),
                           str(root / "images"), str(out)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"ingest of {root} failed:\n{proc.stderr[-4000:]}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", type=float, nargs="+", default=[0.01, 0.05, 0.2])
    parser.add_argument("--root", type=Path, default=Path("/tmp/o365_bench"))
    parser.add_argument("--code", type=Path, default=Path(__file__).resolve().parents[1],
                        help="checkout whose platform/ ingest is measured (default: this one)")
    parser.add_argument("--label", default="streaming ingest")
    parser.add_argument("--record", action="store_true", help="append the rows to benchmarks/RESULTS.md")
    args = parser.parse_args()
    rows = []
    for scale in args.scales:
        root = args.root / f"o365_{scale:g}"
        t0 = time.perf_counter()
        counts = generate(root, scale)
        print(f"set {root}: {counts} (ready in {time.perf_counter() - t0:.0f} s)", flush=True)
        result = measure(root, args.code.resolve(), args.root / f"out_{scale:g}")
        row = {**counts, **result}
        rows.append(row)
        print(json.dumps(row), flush=True)
    lines = [f"| {args.label} | {r['scale']:.0%} | {r['images']:,} / {r['boxes']:,} | {r['json_bytes'] / 2**20:,.0f} MiB "
             f"| {r['wall_s']:.0f} s | {r['peak_rss_bytes'] / 1e9:.2f} GB |" for r in rows]
    if len(rows) >= 2:
        slope, intercept = np.polyfit([r["images"] / 1e6 for r in rows], [r["peak_rss_bytes"] / 1e9 for r in rows], 1)
        lines.append(f"\nFitted driver peak RSS: {intercept:.2f} GB + {slope:.2f} GB per million images "
                     f"(full set, 1.74M images: {intercept + slope * FULL_IMAGES / 1e6:.1f} GB).")
    print("\n".join(lines))
    if args.record:
        stamp = f"{datetime.date.today()} {platform.machine()} {os.cpu_count()} cores"
        with open(Path(__file__).with_name("RESULTS.md"), "a") as handle:
            handle.write(f"\n<!-- bench_ingest {stamp} -->\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
