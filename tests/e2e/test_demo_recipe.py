"""The demo's fine-tune recipe learns a detector: `make demo` shows a model that works, not only plumbing.

Trains the smoke preset's ``finetune`` stage exactly as ``pipelines/o365_pretrain_coco_ft.yaml``
declares it (data, model, schedule, workers, seed) but from the backbone's initialisation
(``init: null``, i.e. ``make demo-compare``), which skips the pretraining stage and so halves the
cost. The recipe is read from the YAML, so a change to the demo is tested here.
"""
from __future__ import annotations


import pytest
from support import REPO

pytestmark = pytest.mark.slow

SPEC = REPO / "pipelines" / "o365_pretrain_coco_ft.yaml"
# Measured on the 2-core x86_64 machine (2026-12-02): AP 0.0721, AP50 0.2362, the same figures as the
# pipeline's `make demo-compare` fine-tune (docs/pipelines.md). Other CPUs change float results in the
# last bits, which moves the trajectory a little, not the outcome; 0.17 leaves 0.066 (28%) for that.
# The demo itself (with the Objects365 transfer) reached AP50 0.43.
MIN_AP50 = 0.17


def test_the_demo_finetune_recipe_reaches_a_useful_ap50(ray_local, tmp_path):
    """Cost: one 180-step, 2-worker training of dino_tiny at <=160 px plus 3 evaluations of 40 images;
    measured 297 s alone and 298 s in a full `make test` on the 2-core machine."""
    from dino_platform.data.ingest import IngestConfig, ingest
    from dino_platform.data.synth import SynthConfig, generate
    from dino_platform.pipeline import load_spec
    from dino_platform.pipeline.stages.train import train_config
    from dino_platform.train.trainer import run_training

    spec = load_spec(SPEC, preset="smoke", overrides=[f"output_root={tmp_path}", "stages.finetune.init=null"])
    stage = spec.stages["finetune"]
    for name in (stage.train_data, stage.eval_data):
        s = spec.datasets[name].synth
        raw = tmp_path / "raw" / name
        generate(SynthConfig(kind=s.kind, images=s.images, seed=s.seed, size=tuple(s.size)), str(raw))
        ingest(IngestConfig(format=spec.datasets[name].format, annotations_uri=str(raw / "annotations.json"),
                            images_uri=str(raw / "images"), out_uri=spec.shards_uri(name),
                            shard_size=spec.datasets[name].shard_size, parallel=False))
    cfg = train_config(spec, "finetune", run_name="recipe")
    outcome = run_training(cfg)
    ap50 = outcome.metrics["eval/AP50"]
    print(f"fine-tune recipe from scratch: AP {outcome.metrics['eval/AP']:.4f} AP50 {ap50:.4f}")
    assert ap50 >= MIN_AP50, outcome.metrics
