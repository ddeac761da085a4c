"""Eval latency on CPU: the ONNX export run by onnxruntime vs the PyTorch model (dino_core eval).

    python benchmarks/bench_export.py                                  # dino_tiny and dino_r50_4scale @800x1333
    python benchmarks/bench_export.py --preset dino_tiny --size 800 1333 --iters 5 --threads 2

Each model (random weights; latency does not depend on them) is exported once at 512x512, then both
runtimes run the same batch-1 input at --size, interleaved, after one warm-up each. PyTorch uses
the MSDeformAttn implementation dino_core picks (the compiled CPU kernel when built); the export
uses the gather form. Prints one Markdown row per model (wall and process CPU medians) and the
largest output difference, for benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import torch

import dino_core
from dino_core.export import export_onnx


def _timed(fn, iters: int):
    wall, cpu = [], []
    for _ in range(iters):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return wall, cpu


def bench(preset: str, height: int, width: int, iters: int, threads: int) -> dict:
    import onnxruntime as ort

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model, _, _ = dino_core.build_model(preset, num_classes=91)
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{preset}.onnx")
        t = time.perf_counter()
        export_onnx(model, path, 512, 512)
        export_s = time.perf_counter() - t
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(0)
    images = torch.randn(1, 3, height, width, generator=g)
    mask = torch.zeros(1, height, width, dtype=torch.bool)
    feeds = {"images": images.numpy(), "mask": mask.numpy()}

    def run_torch():
        with torch.no_grad():
            return model(images, mask)

    def run_onnx():
        return session.run(None, feeds)

    reference, exported = run_torch(), run_onnx()  # warm-up
    logit_err = float(np.abs(exported[0] - reference["pred_logits"].numpy()).max())
    torch_wall, torch_cpu, onnx_wall, onnx_cpu = [], [], [], []
    for _ in range(iters):  # interleaved, so a load change hits both
        w, c = _timed(run_torch, 1)
        torch_wall += w
        torch_cpu += c
        w, c = _timed(run_onnx, 1)
        onnx_wall += w
        onnx_cpu += c
    return {"preset": preset, "size": f"{height}x{width}", "threads": threads, "export_s": export_s,
            "torch_wall": statistics.median(torch_wall), "onnx_wall": statistics.median(onnx_wall),
            "torch_cpu": statistics.median(torch_cpu), "onnx_cpu": statistics.median(onnx_cpu),
            "logit_err": logit_err, "impl": dino_core.selected_implementation("cpu", torch.float32)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", help="repeatable (default dino_tiny and dino_r50_4scale)")
    parser.add_argument("--size", type=int, nargs=2, default=[800, 1333], metavar=("H", "W"))
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    print(f"# {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{datetime.date.today()}, load {load:.1f}")
    print("| model | input | threads | PyTorch eval (wall / CPU ms) | onnxruntime (wall / CPU ms) | ratio (wall) "
          "| export s | max logit diff |")
    print("|---|---|---|---|---|---|---|---|")
    for preset in args.preset or ["dino_tiny", "dino_r50_4scale"]:
        r = bench(preset, *args.size, args.iters, args.threads)
        print(f"| {r['preset']} (PyTorch MSDA: {r['impl']}) | {r['size']} | {r['threads']} "
              f"| {r['torch_wall'] * 1e3:.0f} / {r['torch_cpu'] * 1e3:.0f} "
              f"| {r['onnx_wall'] * 1e3:.0f} / {r['onnx_cpu'] * 1e3:.0f} "
              f"| {r['torch_wall'] / r['onnx_wall']:.2f}x | {r['export_s']:.0f} | {r['logit_err']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
