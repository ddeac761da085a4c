"""Objects365 pretraining -> COCO fine-tuning -> evaluation -> registry (spec: the YAML beside this file).

    python pipelines/o365_pretrain_coco_ft.py --preset smoke      # what `make demo` runs
    ray job submit --working-dir . --runtime-env clusters/job_runtime_env.yaml -- \
        python pipelines/o365_pretrain_coco_ft.py --spec pipelines/o365_pretrain_coco_ft.yaml
"""
import sys
from pathlib import Path

from dino_platform.pipeline.entry import main

if __name__ == "__main__":
    sys.exit(main(default_spec=Path(__file__).with_suffix(".yaml")))
