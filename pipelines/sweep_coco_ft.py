"""Ray Tune sweep over COCO fine-tuning, best trial -> evaluation -> registry (spec: the YAML beside this file).

    python pipelines/sweep_coco_ft.py --preset smoke      # 4 tiny trials on CPU; re-run to resume
    python pipelines/sweep_coco_ft.py --check             # validate the spec, print the search space
"""
import sys
from pathlib import Path

from dino_platform.sweep.entry import main

if __name__ == "__main__":
    sys.exit(main(default_spec=Path(__file__).with_suffix(".yaml")))
