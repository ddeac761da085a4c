"""COCO fine-tuning from an official DINO checkpoint -> evaluation -> registry (spec: the YAML beside this file).

    python pipelines/coco_finetune.py --preset smoke      # local, synthetic data (see the YAML's smoke preset)
    ray job submit --working-dir . --runtime-env clusters/job_runtime_env.yaml -- \
        python pipelines/coco_finetune.py --spec pipelines/coco_finetune.yaml
"""
import sys
from pathlib import Path

from dino_platform.pipeline.entry import main

if __name__ == "__main__":
    sys.exit(main(default_spec=Path(__file__).with_suffix(".yaml")))
