"""COCO evaluation of a registered model or checkpoint (spec: the YAML beside this file).

    python pipelines/coco_eval.py --preset smoke      # local, synthetic data (see the YAML's smoke preset)
    ray job submit --working-dir . --runtime-env clusters/job_runtime_env.yaml -- \
        python pipelines/coco_eval.py --spec pipelines/coco_eval.yaml
"""
import sys
from pathlib import Path

from dino_platform.pipeline.entry import main

if __name__ == "__main__":
    sys.exit(main(default_spec=Path(__file__).with_suffix(".yaml")))
