"""Distributed evaluation: each worker predicts its shard, rank 0 gathers and scores with pycocotools.

Used by the training loop (``_Evaluator``) and by ``dino eval`` (``eval_loop_per_worker``).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from dino_platform.evaluation.coco_eval import CocoResult, ImagePrediction, evaluate_coco
from dino_platform.evaluation.inference import gather_to_rank0, predict_batch, truths_from_targets, valid_sizes

log = logging.getLogger("dino.eval")

RESULT_FILE = "coco_eval.json"


@dataclass
class EvalOutcome:
    coco: CocoResult
    drawings: List[Tuple[Any, Any]] = field(default_factory=list)  # (image_id, PIL image with boxes)

    def metrics(self) -> Dict[str, float]:
        """``eval/AP`` ... plus ``eval/AP/class_<category id>`` for classes with ground truth."""
        out = {f"eval/{k}": v for k, v in self.coco.stats.items()}
        out.update({f"eval/AP/class_{cid}": ap for cid, ap in self.coco.per_class_ap.items() if ap == ap})
        return out

    def log_to(self, tracker, step: int) -> None:
        tracker.log_metrics(self.metrics(), step=step)
        tracker.log_dict(self.coco.to_json(), f"eval/step_{step:07d}/{RESULT_FILE}")
        for image_id, image in self.drawings:
            tracker.log_image(image, f"eval/step_{step:07d}/image_{image_id}.png")


def evaluate_shard(
    model: torch.nn.Module,
    postprocessor: torch.nn.Module,
    shard,
    categories: Mapping[int, str],
    batch_size: int,
    max_detections: int,
    num_drawn: int = 0,
    draw_threshold: float = 0.3,
) -> Optional[EvalOutcome]:
    """Predict every image of this worker's ``shard``; on rank 0 return the COCO result (else None).

    All ranks must call this together (predictions are gathered with torch.distributed).
    ``model`` is a plain module in eval mode; each image is run at its own valid size.
    """
    from dino_platform.train.batches import iter_collated

    truths, predictions, drawings = [], [], []
    for images, mask, targets in iter_collated(shard, batch_size=batch_size, drop_last=False):
        batch_predictions = predict_batch(model, postprocessor, images, mask, targets, max_detections)
        predictions.extend(batch_predictions)
        truths.extend(truths_from_targets(targets))
        if len(drawings) < num_drawn:
            drawings.extend(_draw(images, mask, targets, batch_predictions, categories, draw_threshold)[: num_drawn - len(drawings)])
    all_truths, all_predictions = gather_to_rank0(truths), gather_to_rank0(predictions)
    if all_truths is None:
        return None
    coco = evaluate_coco(all_truths, all_predictions, categories, max_detections=max_detections)
    return EvalOutcome(coco=coco, drawings=drawings)


def _draw(images, mask, targets, predictions: List[ImagePrediction], categories, threshold: float):
    """The network's input images (de-normalized, unpadded) with confident detections drawn on them."""
    from PIL import Image

    from dino_platform.train.batches import denormalize
    from dino_platform.tracking import draw_detections

    out = []
    for i, ((h, w), prediction) in enumerate(zip(valid_sizes(mask), predictions)):
        pixels = denormalize(images[i, :, :h, :w])  # [h, w, 3] uint8
        orig_h, orig_w = (int(v) for v in torch.as_tensor(targets[i]["orig_size"]).tolist())
        keep = prediction.scores >= threshold
        boxes = prediction.boxes[keep] * [w / orig_w, h / orig_h, w / orig_w, h / orig_h]
        image = draw_detections(Image.fromarray(pixels), boxes, prediction.labels[keep], prediction.scores[keep], categories)
        out.append((prediction.image_id, image))
    return out


# ---------------------------------------------------------------------------------------------
# `dino eval`: a TorchTrainer whose workers only evaluate


def eval_loop_per_worker(loop_config: Dict[str, Any]) -> None:
    """Load ``model.pt`` on every worker, evaluate its shard; rank 0 reports the result as a checkpoint."""
    import tempfile

    import ray.train
    import ray.train.torch

    from dino_platform.train.checkpoint import read_model_state
    from dino_platform.train.config import ModelConfig
    from dino_platform.train.engine import build_model

    model_cfg = ModelConfig(**loop_config["model"])
    model, _, postprocessor = build_model(model_cfg)
    model.load_state_dict(read_model_state(loop_config["checkpoint"]))
    model.to(ray.train.torch.get_device()).eval()
    outcome = evaluate_shard(
        model, postprocessor, ray.train.get_dataset_shard("eval"), loop_config["categories"],
        batch_size=loop_config["batch_size"], max_detections=loop_config["max_detections"],
    )
    if outcome is None:
        ray.train.report({})
        return
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / RESULT_FILE).write_text(json.dumps(outcome.coco.to_json()))
        ray.train.report(outcome.metrics(), checkpoint=ray.train.Checkpoint.from_directory(directory))
