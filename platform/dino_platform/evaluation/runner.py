"""Distributed evaluation: each worker predicts its shard, rank 0 gathers and scores with pycocotools.

Ground truth comes from the shard directory's own annotations (``data.manifest.read_ground_truth``:
original pixels, crowd flags, areas), not from the network's transformed targets, so the score is
the dataset's COCO AP. Used by the training loop and by ``dino eval`` (``run_evaluation``).
"""
from __future__ import annotations

import json
import logging
import tempfile
from itertools import islice
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from dino_platform.errors import DataError
from dino_platform.evaluation.coco_eval import (
    CocoResult, Detections, EvalConfig, EvalProtocol, ImagePrediction, evaluate_coco, protocol_tags, truths_from_coco,
)
from dino_platform.evaluation.inference import gather_detections, predict_batch, valid_sizes

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
        tracker.set_tags(protocol_tags(self.coco.protocol))
        tracker.log_metrics(self.metrics(), step=step)
        tracker.log_dict(self.coco.to_json(), f"eval/step_{step:07d}/{RESULT_FILE}")
        for image_id, image in self.drawings:
            tracker.log_image(image, f"eval/step_{step:07d}/image_{image_id}.png")


def evaluate_shard(
    model: torch.nn.Module,
    postprocessor: torch.nn.Module,
    shard,
    ground_truth: Optional[Dict[str, Any]],
    batch_size: int,
    protocol: EvalProtocol,
    normalization: Tuple[Sequence[float], Sequence[float]],
    num_drawn: int = 0,
    draw_threshold: float = 0.3,
) -> Optional[EvalOutcome]:
    """Predict every image of this worker's ``shard``; on rank 0 return the COCO result (else None).

    All ranks must call this together (predictions are gathered with torch.distributed); ``model`` is a
    plain module in eval mode. ``ground_truth``: the shard directory's COCO-format annotations
    (``read_ground_truth``), needed on rank 0 only. ``normalization``: the evaluation transform's (mean, std).
    ``protocol.detections_per_image`` cuts on the workers, so less is gathered.
    """
    from dino_platform.data.batches import iter_collated

    parts, drawings = [], []

    def no_detections(skipped):  # a sample data.on_sample_error=skip left out is scored as no detections
        parts.append(Detections.from_predictions([
            ImagePrediction(image_id, np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))
            for image_id, _ in skipped]))

    for images, mask, targets in iter_collated(shard, batch_size=batch_size, drop_last=False,
                                               normalization=normalization, on_skipped=no_detections):
        batch_predictions = predict_batch(model, postprocessor, images, mask, targets, protocol.detections_per_image)
        parts.append(Detections.from_predictions(batch_predictions))
        if len(drawings) < num_drawn:
            drawings.extend(_draw(images, mask, targets, batch_predictions, num_drawn - len(drawings),
                                  draw_threshold, normalization))
    everything = gather_detections(Detections.concat(parts))
    if everything is None:
        return None
    expected = {img["id"] for img in ground_truth["images"]}
    seen = everything.image_ids
    if len(seen) != len(set(seen)) or set(seen) != expected:
        raise DataError(f"evaluation covered {len(set(seen))} distinct images ({len(seen)} predictions) "
                        f"but the shards hold {len(expected)}; every image must be evaluated exactly once")
    from dino_platform.drawing import draw_detections

    categories = {c["id"]: c["name"] for c in ground_truth["categories"]}
    coco = evaluate_coco(truths_from_coco(ground_truth), everything, categories, protocol)
    return EvalOutcome(coco=coco, drawings=[(i, draw_detections(*drawing, categories)) for i, drawing in drawings])


def _draw(images, mask, targets, predictions: List[ImagePrediction], limit: int, threshold: float, normalization):
    """Up to ``limit`` (image_id, (network input de-normalised and unpadded, boxes, labels, scores)) of the
    confident detections, boxes scaled to that input: ``draw_detections``' arguments but the class names."""
    from PIL import Image

    from dino_platform.data.batches import denormalize

    out = []
    for i, ((h, w), prediction) in enumerate(islice(zip(valid_sizes(mask), predictions), limit)):
        orig_h, orig_w = (int(v) for v in torch.as_tensor(targets[i]["orig_size"]).tolist())
        keep = prediction.scores >= threshold
        scale = [w / orig_w, h / orig_h, w / orig_w, h / orig_h]
        out.append((prediction.image_id, (Image.fromarray(denormalize(images[i, :, :h, :w], *normalization)),
                                          prediction.boxes[keep] * scale, prediction.labels[keep],
                                          prediction.scores[keep])))
    return out


# ---------------------------------------------------------------------------------------------
# `dino eval`: a TorchTrainer whose workers only evaluate


def eval_loop_per_worker(loop_config: Dict[str, Any]) -> None:
    """Every worker builds ``loop_config["artifact"]`` and predicts its shard; rank 0 reports the COCO result."""
    import ray.train
    import ray.train.torch

    model, postprocessor = loop_config["artifact"].build()
    model.to(ray.train.torch.get_device())
    outcome = evaluate_shard(
        model, postprocessor, ray.train.get_dataset_shard("eval"),
        loop_config["ground_truth"] if ray.train.get_context().get_world_rank() == 0 else None,
        batch_size=loop_config["eval"].batch_size,
        protocol=loop_config["eval"].protocol(num_select=int(postprocessor.num_select)),
        normalization=loop_config["normalization"],
    )
    if outcome is None:
        ray.train.report({})
        return
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / RESULT_FILE).write_text(json.dumps(outcome.coco.to_json()))
        ray.train.report(outcome.metrics(), checkpoint=ray.train.Checkpoint.from_directory(directory))


def run_evaluation(
    checkpoint_uri: str,
    data_uri: str,
    config: EvalConfig = EvalConfig(),
    num_workers: int = 1,
    model: Optional[Dict[str, Any]] = None,
    transform: Optional[Dict[str, Any]] = None,
    use_gpu: bool = False,
    cpus_per_worker: float = 0.5,
) -> Dict[str, Any]:
    """COCO evaluation of a model on a shard directory with ``num_workers`` Ray Train workers.

    ``checkpoint_uri``: anything ``model.artifact.load_artifact`` reads. ``model`` (preset, num_classes,
    overrides) and ``transform`` replace what the artifact records; an official ``.pth`` needs ``model``.
    ``config``: batch size and protocol (default: official DINO).
    Returns the COCO eval JSON (``protocol``, ``stats``, ``per_class``, ``detections``) and the ``model``
    (preset, num_classes, overrides) and ``transform`` it evaluated with.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from dino_platform.data.manifest import read_ground_truth
    from dino_platform.data.streaming import build_eval_dataset
    from dino_platform.data.sharding import OrderedShards
    from dino_platform.data.transforms import transform_configs
    from dino_platform.model.artifact import load_artifact
    from dino_platform.ray_session import connect

    artifact = load_artifact(checkpoint_uri, **(model or {}))
    if transform is not None:
        artifact = replace(artifact, transform=dict(transform))
    _, eval_transform = transform_configs(artifact.transform)
    connect()
    with tempfile.TemporaryDirectory(prefix="dino-eval-") as storage:
        trainer = TorchTrainer(
            eval_loop_per_worker,
            train_loop_config={"artifact": artifact, "ground_truth": read_ground_truth(data_uri), "eval": config,
                               "normalization": (eval_transform.mean, eval_transform.std)},
            scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                                   resources_per_worker={"CPU": cpus_per_worker}),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=ray.train.RunConfig(name="eval", storage_path=storage),
            datasets={"eval": build_eval_dataset(data_uri, artifact.transform)},
            dataset_config=OrderedShards(),
        )
        result = trainer.fit()
        with result.checkpoint.as_directory() as directory:
            evaluation = json.loads((Path(directory) / RESULT_FILE).read_text())
    used = {k: getattr(artifact.model, k) for k in ("preset", "num_classes", "overrides")}
    return {**evaluation, "model": used, "transform": artifact.transform}
