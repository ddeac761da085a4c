"""Time the MSDeformAttn implementations at DINO R50 4-scale shapes.

Batch 2 at 800x1333 gives levels (100, 167), (50, 84), (25, 42), (13, 21): S = 22,223 keys.
The encoder queries every key (Lq = S, reference point = the key's own pixel); the decoder has
900 + 200 (denoising) queries placed anywhere. 8 heads x 32 channels, 4 levels x 4 points,
sampling offsets of a few pixels (normal, sigma 2 px of each level).

    python benchmarks/bench_msda.py --device cpu
    python benchmarks/bench_msda.py --device cuda --dtype bfloat16
    python benchmarks/bench_msda.py --device cuda --baseline my_pkg.ops:deformable_detr_msda
    python benchmarks/bench_msda.py --quick          # small shapes, for a smoke run

Every implementation is checked against the reference on the same inputs before it is timed
(the "max |diff|" column). Repeats are interleaved across implementations so that load from
other processes hits them alike; medians are reported. On CPU the process CPU time is reported
too: on a shared, loaded machine, ``--threads 1`` and the CPU-time columns are the fair comparison.
"""
from __future__ import annotations

import argparse
import importlib
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import date
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from dino_core.ops import available_implementations, get_implementation, ms_deform_attn_reference

MsdaFn = Callable[..., torch.Tensor]

DINO_R50_LEVELS = ((100, 167), (50, 84), (25, 42), (13, 21))
QUICK_LEVELS = ((25, 42), (13, 21), (7, 11), (4, 6))
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    levels: Tuple[Tuple[int, int], ...]
    queries: int
    heads: int = 8
    channels: int = 32
    points: int = 4


def dino_cases(quick: bool) -> List[Case]:
    levels = QUICK_LEVELS if quick else DINO_R50_LEVELS
    keys = sum(h * w for h, w in levels)
    return [Case("encoder", 2, levels, keys), Case("decoder", 2, levels, 300 if quick else 900 + 200)]


def make_inputs(case: Case, device: str, dtype: torch.dtype, seed: int = 0) -> Tuple[torch.Tensor, ...]:
    """Value in ``dtype``, locations/weights in float32 as DINO produces them under autocast."""
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(case.levels, dtype=torch.long)
    areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    keys = int(areas.sum())
    num_levels = len(case.levels)
    value = torch.randn(case.batch, keys, case.heads, case.channels, generator=gen)
    if case.queries == keys:
        # Encoder: each query's reference point is its own pixel centre, as in DINO's encoder.
        centres = torch.cat([
            torch.stack(torch.meshgrid((torch.arange(w) + 0.5) / w, (torch.arange(h) + 0.5) / h, indexing="xy"), -1)
            .reshape(-1, 2) for h, w in case.levels])
        centres = centres.expand(case.batch, -1, -1)
    else:
        # Decoder: queries (boxes) anywhere in the image.
        centres = torch.rand(case.batch, case.queries, 2, generator=gen)
    # Offsets of a few pixels of each level, like a trained model's sampling offsets.
    pixel = 1.0 / spatial_shapes.flip(-1).float()  # [L, 2] (1/W, 1/H)
    offsets = 2.0 * torch.randn(case.batch, case.queries, case.heads, num_levels, case.points, 2, generator=gen)
    locations = centres[:, :, None, None, None, :] + offsets * pixel[:, None, :]
    weights = torch.rand(case.batch, case.queries, case.heads, num_levels * case.points, generator=gen).softmax(-1)
    weights = weights.view(case.batch, case.queries, case.heads, num_levels, case.points)
    coord_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return (value.to(device, dtype), spatial_shapes.to(device), level_start_index.to(device),
            locations.to(device, coord_dtype), weights.to(device, coord_dtype))


def reference_dtype_inputs(inputs: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """grid_sample wants one dtype: the reference gets locations/weights in value's dtype."""
    value, shapes, starts, locations, weights = inputs
    return value, shapes, starts, locations.to(value.dtype), weights.to(value.dtype)


def load_baseline(spec: str) -> Tuple[str, MsdaFn]:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(f"--baseline {spec!r}: expected module:function, e.g. my_pkg.ops:msda_forward")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"--baseline {spec!r}: cannot load it ({exc})") from exc
    return spec, fn


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_once(fn: MsdaFn, inputs: Sequence[torch.Tensor], backward: bool, grad_output: torch.Tensor) -> None:
    if not backward:
        with torch.no_grad():
            fn(*inputs)
        return
    value, shapes, starts, locations, weights = (t.detach().requires_grad_(t.is_floating_point()) for t in inputs)
    out = fn(value, shapes, starts, locations, weights)
    out.backward(grad_output)


def time_interleaved(
    impls: Dict[str, MsdaFn], inputs: Dict[str, Tuple[torch.Tensor, ...]], device: str, backward: bool,
    grad_output: torch.Tensor, repeats: int, warmup: int,
) -> Tuple[Dict[str, float], Dict[str, float]]:
    """Median wall seconds and median process CPU seconds per call, per implementation."""
    wall: Dict[str, List[float]] = {name: [] for name in impls}
    cpu: Dict[str, List[float]] = {name: [] for name in impls}
    for round_index in range(warmup + repeats):
        for name, fn in impls.items():
            synchronize(device)
            started, started_cpu = time.perf_counter(), time.process_time()
            run_once(fn, inputs[name], backward, grad_output)
            synchronize(device)
            if round_index >= warmup:
                wall[name].append(time.perf_counter() - started)
                cpu[name].append(time.process_time() - started_cpu)
    return ({name: statistics.median(t) for name, t in wall.items()},
            {name: statistics.median(t) for name, t in cpu.items()})


def describe_device(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:N]")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--baseline", action="append", default=[], metavar="MODULE:FUNCTION",
                        help="another implementation with ms_deform_attn's signature (repeatable)")
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    parser.add_argument("--cases", default="encoder,decoder", help="comma-separated subset of encoder,decoder")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3 on CPU, 20 on GPU)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for CPU runs")
    args = parser.parse_args(argv)

    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    repeats = args.repeats or (20 if device.startswith("cuda") else 3)
    device_type = torch.device(device).type

    impls: Dict[str, MsdaFn] = {"pytorch": ms_deform_attn_reference}
    if device_type in available_implementations():
        impls[device_type] = get_implementation(device_type)
    for spec in args.baseline:
        name, fn = load_baseline(spec)
        impls[name] = fn

    wanted = {name.strip() for name in args.cases.split(",")}
    print(f"MSDeformAttn benchmark on {describe_device(device)}, {args.dtype}, torch {torch.__version__}, "
          f"{date.today().isoformat()}; median of {repeats}")
    on_cpu = device_type == "cpu"
    header = (f"{'case / implementation':<36} {'fwd ms':>9} {'f+b ms':>9} {'fwd x':>6} {'f+b x':>6}"
              + (f" {'fwd cpu-ms':>10} {'f+b cpu-ms':>10} {'fwd x':>6} {'f+b x':>6}" if on_cpu else "")
              + f" {'max |diff|':>10}")
    print(header)
    print("-" * len(header))
    for case in dino_cases(args.quick):
        if case.name not in wanted:
            continue
        base_inputs = make_inputs(case, device, dtype)
        inputs = {name: reference_dtype_inputs(base_inputs) if fn is ms_deform_attn_reference else base_inputs
                  for name, fn in impls.items()}
        with torch.no_grad():
            expected = ms_deform_attn_reference(*inputs["pytorch"]).float()
            diffs = {name: (fn(*inputs[name]).float() - expected).abs().max().item() for name, fn in impls.items()}
        grad_output = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
        forward, forward_cpu = time_interleaved(impls, inputs, device, False, grad_output, repeats, args.warmup)
        both, both_cpu = time_interleaved(impls, inputs, device, True, grad_output, repeats, args.warmup)
        print(f"{case.name} (batch {case.batch}, Lq={case.queries}, S={sum(h * w for h, w in case.levels)})")
        for name in impls:
            line = (f"  {name:<34} {forward[name] * 1e3:>9.1f} {both[name] * 1e3:>9.1f} "
                    f"{forward['pytorch'] / forward[name]:>6.2f} {both['pytorch'] / both[name]:>6.2f}")
            if on_cpu:
                line += (f" {forward_cpu[name] * 1e3:>10.1f} {both_cpu[name] * 1e3:>10.1f} "
                         f"{forward_cpu['pytorch'] / forward_cpu[name]:>6.2f} {both_cpu['pytorch'] / both_cpu[name]:>6.2f}")
            print(line + f" {diffs[name]:>10.2e}")
    print("x = speed-up over the pytorch reference (grid_sample) on the same inputs; f+b = forward + backward")
    if device_type == "cpu":
        print("cpu-ms = process CPU time (all threads); on a shared machine compare those, with --threads 1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
