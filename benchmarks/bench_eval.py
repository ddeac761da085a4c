"""COCO evaluation engines end to end: faster-coco-eval vs pycocotools, time and peak memory.

    python benchmarks/bench_eval.py                      # both sets below, both engines
    python benchmarks/bench_eval.py --sets coco --repeats 1

Each measurement runs in a fresh subprocess: it generates the synthetic set (seeded), then times
``evaluate_coco`` (building the COCO objects included: ground truth and detection dicts, index,
evaluate, accumulate, summarize) under the official DINO protocol (all 300 detections per image,
maxDets 100), wall and CPU seconds (CPU time is the steadier figure on a shared machine), and
the process's peak RSS above what it held once the set was generated.
The two engines' 12 summary stats are compared (max absolute difference).

Sets: ``coco`` 5,000 images x 80 classes (COCO val size); ``o365`` an Objects365-like set, 365
classes, ``--o365-images`` images (1,000 by default: a few minutes for pycocotools here).
Ground truth: 1-15 boxes per image, areas spread over small/medium/large, ~1% crowd; detections:
300 per image, noisy copies of the ground truth plus false positives, scores in [0, 1].
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

SETS = {"coco": (5000, 80), "o365": (1000, 365)}


def make_set(images: int, classes: int, seed: int = 0, per_image: int = 300):
    import numpy as np

    from dino_platform.evaluation.coco_eval import Detections, ImageTruth

    rng = np.random.default_rng(seed)
    truths, ids, counts, boxes, scores, labels = [], [], [], [], [], []
    for i in range(images):
        k = int(rng.integers(1, 16))
        side = np.exp(rng.uniform(np.log(8), np.log(400), size=k))
        xy = rng.uniform(0, 640 - side[:, None].clip(max=600), size=(k, 2))
        wh = side[:, None] * rng.uniform(0.5, 1.5, size=(k, 2))
        gt = np.concatenate([xy, xy + wh], 1)
        gl = rng.integers(1, classes + 1, size=k)
        truths.append(ImageTruth(image_id=i + 1, height=640, width=640, boxes=gt, labels=gl,
                                 iscrowd=(rng.uniform(size=k) < 0.01).astype(np.int64)))
        hits = rng.integers(0, k, size=per_image // 3)
        jitter = rng.normal(0, 0.1, size=(len(hits), 4)) * np.repeat(side[hits, None], 4, 1)
        fp_xy = rng.uniform(0, 600, size=(per_image - len(hits), 2))
        fp = np.concatenate([fp_xy, fp_xy + rng.uniform(8, 200, size=(len(fp_xy), 2))], 1)
        hit_labels = np.where(rng.uniform(size=len(hits)) < 0.8, gl[hits], rng.integers(1, classes + 1, len(hits)))
        ids.append(i + 1)
        counts.append(per_image)
        boxes.append(np.concatenate([gt[hits] + jitter, fp]))
        scores.append(np.concatenate([rng.beta(4, 2, len(hits)), rng.beta(1.5, 4, len(fp))]))
        labels.append(np.concatenate([hit_labels, rng.integers(1, classes + 1, len(fp))]))
    detections = Detections(ids, np.asarray(counts), np.concatenate(boxes).astype(np.float32),
                            np.concatenate(scores).astype(np.float32), np.concatenate(labels))
    categories = {c: f"class_{c}" for c in range(1, classes + 1)}
    return truths, detections, categories


def _rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(set_name: str, images: int, classes: int, engine: str) -> None:
    """One measurement (run in its own process); prints a JSON line."""
    from dino_platform.evaluation.coco_eval import EvalProtocol, evaluate_coco

    if engine == "pycocotools":  # imported before the baseline: its modules are not the evaluation's memory
        import pycocotools.cocoeval  # noqa: F401
    else:
        import faster_coco_eval  # noqa: F401
    truths, detections, categories = make_set(images, classes)
    before = _rss_mb()
    started, cpu_started = time.perf_counter(), time.process_time()
    result = evaluate_coco(truths, detections, categories, EvalProtocol(num_select=300, engine=engine))
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"set": set_name, "engine": engine, "images": images, "classes": classes,
                      "detections": int(detections.counts.sum()), "seconds": seconds, "cpu_seconds": cpu_seconds,
                      "peak_rss_above_set_mb": peak - before, "stats": result.stats}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--o365-images", type=int, default=SETS["o365"][0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, images, classes, engine = args.child
        child(name, int(images), int(classes), engine)
        return 0
    print(f"# {platform.processor() or platform.machine()}, {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d')}")
    for name in args.sets:
        images, classes = SETS[name]
        if name == "o365":
            images = args.o365_images
        runs = {}
        for engine in ("faster_coco_eval", "pycocotools"):
            for _ in range(args.repeats):
                out = subprocess.run([sys.executable, __file__, "--child", name, str(images), str(classes), engine],
                                     capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
                record = json.loads(out)
                best = runs.get(engine)
                if best is None or record["seconds"] < best["seconds"]:
                    runs[engine] = record
        fast, ref = runs["faster_coco_eval"], runs["pycocotools"]
        diff = max(abs(fast["stats"][k] - ref["stats"][k]) for k in ref["stats"])
        print(f"{name}: {images} images x {classes} classes, {fast['detections']} detections; "
              f"faster_coco_eval {fast['seconds']:.2f} s wall / {fast['cpu_seconds']:.2f} s CPU "
              f"({fast['peak_rss_above_set_mb']:.0f} MB), pycocotools {ref['seconds']:.2f} s wall / "
              f"{ref['cpu_seconds']:.2f} s CPU ({ref['peak_rss_above_set_mb']:.0f} MB); ratio {ref['seconds'] / fast['seconds']:.2f}x "
              f"wall, {ref['cpu_seconds'] / fast['cpu_seconds']:.2f}x CPU; max |stat diff| {diff:.2e}; AP {ref['stats']['AP']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
