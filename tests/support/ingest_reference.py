"""The ingest cases whose outputs are pinned in ``fixtures/ingest_reference.json``.

``fixtures/ingest_reference.json`` holds, for each case, the sha256 of every input file and of every
output (each shard, the manifest with the temporary root replaced by ``<root>``), as written by the
ingest that parsed the whole JSON in memory (commit e41e98d, before the streaming ingest). The
streaming ingest must reproduce them byte for byte (tests/platform/data/test_ingest_parity.py).

Regenerate with another revision's ingest (only when the shard format changes on purpose)::

    git archive <rev> platform | tar -x -C /tmp/ref
    PYTHONPATH=/tmp/ref/platform:tests python tests/support/ingest_reference.py > tests/fixtures/ingest_reference.json
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Callable, Dict

from dino_platform.data.synth import SynthConfig, generate

from support import FIXTURES

FIXTURE = FIXTURES / "ingest_reference.json"


def _clean_coco(root: Path) -> Path:
    generate(SynthConfig(kind="coco", images=14, seed=3, size=(160, 120)), str(root))
    return root


def _broken_coco(root: Path) -> Path:
    from test_ingest import (
        _broken_copy,  # the broken set of test_ingest: one of each bad input
    )

    _broken_copy(_clean_coco(root.with_name(root.name + "_clean")), root)
    return root


def _objects365(root: Path) -> Path:
    generate(SynthConfig(kind="o365", images=55, seed=4, size=(96, 80)), str(root))
    return root


# case -> (source builder, format, shard sizes)
CASES: Dict[str, tuple] = {
    "clean_coco": (_clean_coco, "coco", (3, 5, 512)),
    "broken_coco": (_broken_coco, "coco", (1, 4)),
    "objects365": (_objects365, "o365", (20,)),
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def input_digests(source: Path) -> Dict[str, str]:
    return {str(p.relative_to(source)): sha256(p.read_bytes()) for p in sorted(source.rglob("*")) if p.is_file()}


def output_digests(out: Path, root: Path) -> Dict[str, str]:
    """sha256 of every file of a finished ingest; the manifest's paths made relative to ``root``."""
    digests = {}
    for path in sorted(out.iterdir()):
        data = path.read_bytes()
        if path.name == "manifest.json":  # the plan digest hashes the images URI: a temporary path
            plan = json.loads(data)["plan_digest"]
            data = data.replace(str(root).encode(), b"<root>").replace(plan.encode(), b"<plan>")
        digests[path.name] = sha256(data)
    return digests


def run_case(name: str, root: Path, ingest: Callable, config: Callable, shard_size: int) -> Dict[str, object]:
    """Build case ``name``'s source under ``root`` (once) and ingest it with ``shard_size``."""
    builder, fmt, _ = CASES[name]
    source = root / name
    if not source.exists():
        builder(source)
    out = root / f"{name}_out_{shard_size}"
    shutil.rmtree(out, ignore_errors=True)
    manifest = ingest(config(fmt, str(source / "annotations.json"), str(source / "images"), str(out),
                             shard_size=shard_size, parallel=False))
    return {"inputs": input_digests(source), "outputs": output_digests(out, root), "digest": manifest.digest,
            "plan_digest": manifest.plan_digest}


def main() -> None:
    import tempfile

    from dino_platform.data.ingest import IngestConfig, ingest

    reference = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (_, _, sizes) in CASES.items():
            for size in sizes:
                result = run_case(name, Path(tmp), ingest, IngestConfig, size)
                result["plan_digest"] = None  # it hashes the images URI, which names the temporary root
                reference[f"{name}/{size}"] = result
    json.dump(reference, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
