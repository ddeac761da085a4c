"""`dino infer` throughput: one model actor vs two on a 2-CPU Ray instance.

    python benchmarks/bench_infer.py [--images 64] [--size 640x480] [--scale 0.6] [--repeats 2]

Synthetic JPEGs (default 640x480), an untrained dino_tiny checkpoint (evaluation resize
``transform.scale`` x 800 px short side: 480 px by default, about 0.37 s of model time per image on
one core, so the job is model-bound as real inference is), threshold 0. Each configuration
writes to a fresh output directory (nothing is skipped); the time is ``run_inference`` end to
end (model put in the object store, actors started, every image decoded, predicted and
written), best of ``--repeats``, configurations alternated.
  one actor:  1 actor x 1 CPU (1 torch thread), decode tasks 0.5 CPU
  two actors: 2 actors x 0.75 CPU (1 torch thread each), decode tasks 0.25 CPU
  one actor, 2 threads: 1 actor x 1.5 CPU (2 torch threads), decode tasks 0.5 CPU (for context:
    intra-op threads instead of a second actor)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", default="640x480", help="WIDTHxHEIGHT of the synthetic images")
    parser.add_argument("--scale", type=float, default=0.6, help="transform.scale of the checkpoint")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import ray
    import torch

    import dino_core
    from dino_platform.data.synth import SynthConfig, generate
    from dino_platform.model.artifact import write_artifact
    from dino_platform.model.config import ModelConfig
    from dino_platform.serving.infer import InferConfig, run_inference

    work = Path(tempfile.mkdtemp(prefix="bench-infer-"))
    width, height = (int(v) for v in args.size.lower().split("x"))
    generate(SynthConfig(kind="coco", images=args.images, seed=1, size=(width, height)), str(work / "raw"))
    torch.manual_seed(0)
    model, _, _ = dino_core.build_model("dino_tiny", num_classes=91)
    write_artifact(work / "ckpt", dino_core.export_official_state_dict(model), ModelConfig("dino_tiny", 91),
                   {"scale": args.scale}, {})
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    configs = {"one actor": dict(concurrency=1, cpus_per_actor=1.0, cpus_per_decode_task=0.5),
               "two actors": dict(concurrency=2, cpus_per_actor=0.75, cpus_per_decode_task=0.25),
               "one actor, 2 threads": dict(concurrency=1, cpus_per_actor=1.5, cpus_per_decode_task=0.5)}
    best = {name: float("inf") for name in configs}
    digests = {name: set() for name in configs}
    for repeat in range(args.repeats):
        for name, settings in configs.items():
            out = work / f"out-{name.replace(' ', '_')}-{repeat}"
            started = time.perf_counter()
            manifest = run_inference(InferConfig(model=str(work / "ckpt"), images=str(work / "raw" / "images"),
                                                 out=str(out), threshold=0.0, part_size=16, **settings))
            seconds = time.perf_counter() - started
            digests[name].add(manifest["digest"])
            best[name] = min(best[name], seconds)
            print(f"{name} (run {repeat + 1}): {seconds:.1f} s, {args.images / seconds:.2f} img/s", flush=True)
    ray.shutdown()
    one, two, threads = best["one actor"], best["two actors"], best["one actor, 2 threads"]
    print(f"{args.images} images {args.size}, scale {args.scale}: one actor {one:.1f} s ({args.images / one:.2f} img/s), "
          f"two actors {two:.1f} s ({args.images / two:.2f} img/s), one actor with 2 threads {threads:.1f} s "
          f"({args.images / threads:.2f} img/s); two actors vs one: {one / two:.2f}x, vs 2 threads: "
          f"{threads / two:.2f}x")
    # 1 torch thread per actor in the first two, so their floats (and digests) must agree; 2 threads
    # split reductions differently, which may change the last bits of a score
    same_actors = digests["one actor"] == digests["two actors"] and len(digests["one actor"]) == 1
    print(f"identical output, one vs two actors: {same_actors}; "
          f"one actor with 2 threads the same: {digests['one actor, 2 threads'] == digests['one actor']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
