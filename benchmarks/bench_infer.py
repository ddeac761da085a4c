"""`dino infer` throughput: one model actor vs two on a 2-CPU Ray instance.

    python benchmarks/bench_infer.py [--images 80] [--repeats 2]

Synthetic 128x96 JPEGs, an untrained dino_tiny checkpoint (evaluation resize to a 96 px short
side), threshold 0. Each configuration writes to a fresh output directory (nothing is skipped);
the time is ``run_inference`` end to end (model put in the object store, actors started, every
image decoded, predicted and written), best of ``--repeats``, configurations alternated.
  one actor:  1 actor x 1 CPU (1 torch thread), decode tasks 0.5 CPU
  two actors: 2 actors x 0.75 CPU (1 torch thread each), decode tasks 0.25 CPU
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import ray
    import torch

    import dino_core
    from dino_platform.data.synth import SynthConfig, generate
    from dino_platform.infer.job import InferConfig, run_inference

    work = Path(tempfile.mkdtemp(prefix="bench-infer-"))
    generate(SynthConfig(kind="coco", images=args.images, seed=1, size=(128, 96)), str(work / "raw"))
    torch.manual_seed(0)
    model, _, _ = dino_core.build_model("dino_tiny", num_classes=91)
    (work / "ckpt").mkdir()
    torch.save(dino_core.export_official_state_dict(model), work / "ckpt" / "model.pt")
    (work / "ckpt" / "train_config.json").write_text(json.dumps(
        {"model": {"preset": "dino_tiny", "num_classes": 91}, "data": {"transform": {"scale": 0.15}}}))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    configs = {"one actor": dict(concurrency=1, cpus_per_actor=1.0, cpus_per_decode_task=0.5),
               "two actors": dict(concurrency=2, cpus_per_actor=0.75, cpus_per_decode_task=0.25)}
    best = {name: float("inf") for name in configs}
    digests = set()
    for repeat in range(args.repeats):
        for name, settings in configs.items():
            out = work / f"out-{name.replace(' ', '_')}-{repeat}"
            started = time.perf_counter()
            manifest = run_inference(InferConfig(model=str(work / "ckpt"), images=str(work / "raw" / "images"),
                                                 out=str(out), threshold=0.0, part_size=16, **settings))
            seconds = time.perf_counter() - started
            digests.add(manifest["digest"])
            best[name] = min(best[name], seconds)
            print(f"{name} (run {repeat + 1}): {seconds:.1f} s, {args.images / seconds:.2f} img/s", flush=True)
    ray.shutdown()
    one, two = best["one actor"], best["two actors"]
    print(f"{args.images} images: one actor {one:.1f} s ({args.images / one:.2f} img/s), two actors {two:.1f} s "
          f"({args.images / two:.2f} img/s); speed-up {one / two:.2f}x; identical output: {len(digests) == 1}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
