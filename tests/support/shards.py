"""Small shard directories for tests that train: synthetic pictures, ingested in-process."""
from pathlib import Path
from typing import Optional, Tuple


def synthetic_shards(root: Path, images: int, seed: int, size: Tuple[int, int] = (128, 96),
                     out_uri: Optional[str] = None) -> str:
    """``images`` synthetic COCO-like pictures generated in ``root/raw`` and ingested in-process to
    ``out_uri`` (default ``root/shards``); returns the shards' URI."""
    from dino_platform.data.ingest import IngestConfig, ingest
    from dino_platform.data.synth import SynthConfig, generate

    out_uri = out_uri or str(root / "shards")
    generate(SynthConfig(kind="coco", images=images, seed=seed, size=tuple(size)), str(root / "raw"))
    ingest(IngestConfig(format="coco", annotations_uri=str(root / "raw" / "annotations.json"),
                        images_uri=str(root / "raw" / "images"), out_uri=out_uri, parallel=False))
    return out_uri
