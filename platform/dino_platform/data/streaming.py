"""Shards -> Ray Data -> model-ready samples, and ``collate`` for the training/evaluation loops.

::

    ds = build_train_dataset("s3://bucket/shards/coco-train", TrainTransformConfig.scaled(0.4), seed=0)
    trainer = TorchTrainer(..., datasets={"train": ds})        # workers: get_dataset_shard("train")
    for batch in shard.iter_batches(batch_size=2, batch_format="numpy"):
        images, mask, targets = collate(batch)

Rows of both datasets: ``transforms.make_sample``'s (``image uint8 [3, h, w]``, ``labels``,
``boxes``, ``image_id``, ``orig_size``, ``size``) plus ``sample_error``. Decoding and augmentation
run in one ``map_batches`` over Arrow batches (no pandas, no per-row Ray overhead). Rows carry
uint8 pixels, not float32: a quarter of the bytes to convert, store and hand to the trainer
(benchmarks/RESULTS.md); ``collate`` normalises them in the copy it makes anyway.

Reproducibility: each image's augmentation is drawn from a generator seeded by ``(seed, epoch,
image_id)``, so it does not depend on worker count, batch boundaries or arrival order. ``epoch`` is
the ``epoch`` argument plus the passes completed before (Ray Data's execution index), so each pass
over ``get_dataset_shard`` sees fresh, reproducible augmentation; file order is shuffled per pass
with the same seed.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import torch

from dino_platform.data.manifest import read_manifest, shard_locations, verify_shards
from dino_platform.errors import ConfigError, DataError
from dino_platform.data.transforms import (
    IMAGENET_MEAN, IMAGENET_STD, EvalTransformConfig, TrainTransformConfig, eval_plan, make_sample,
    normalize_into, sample_rng, sample_train_plan, transform_configs,
)

READ_COLUMNS = ["image_id", "file_name", "width", "height", "image", "boxes", "category_ids", "iscrowd"]
SAMPLE_KEYS = ("image", "labels", "boxes", "image_id", "orig_size", "size")  # of transforms.make_sample
SAMPLE_ERROR_POLICIES = ("fail", "skip")
SAMPLE_ERRORS_DIR = "sample_errors"  # under the run directory: one JSON record per skipped sample
MAP_BATCH_SIZE = 16  # rows per decode task: big enough to amortise task overhead, small for memory

log = logging.getLogger("dino.data")

TrainTransform = Union[TrainTransformConfig, Mapping[str, Any], None]
EvalTransform = Union[EvalTransformConfig, Mapping[str, Any], None]


def _execution_index() -> int:
    from ray.data import DataContext

    # NOTE: private attribute; Ray Data's own seeded random expressions read it the same way.
    # It counts completed executions of this dataset and travels with the task's DataContext.
    return int(getattr(DataContext.get_current(), "_execution_idx", 0))


def _flat_lists(column: pa.ChunkedArray, width: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """(offsets [rows+1], flat values) of a list column, without a Python object per element."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = array.offsets.to_numpy() - array.offsets[0].as_py()
    values = array.flatten()
    if width:
        values = values.flatten()
    return offsets, values.to_numpy(zero_copy_only=False)


def _sample_failure(exc: BaseException, image_id: int, file_name: str, width: int, height: int,
                    train_cfg: Optional[TrainTransformConfig], seed: int, epoch: int, plan) -> str:
    """One line that names the sample and reproduces it with one call."""
    if train_cfg is not None:
        where = (f"training sample: image id {image_id}, file {file_name!r} ({width}x{height}), "
                 f"epoch {epoch}, seed {seed}, plan {plan}; reproduce with "
                 f"transforms.sample_train_plan({width}, {height}, cfg, transforms.sample_rng({seed}, {epoch}, {image_id}))")
    else:
        where = (f"evaluation sample: image id {image_id}, file {file_name!r} ({width}x{height}), plan {plan}; "
                 f"reproduce with transforms.eval_plan({width}, {height}, cfg)")
    return f"{where} then transforms.make_sample(...): {type(exc).__name__}: {exc}"


def _transform_batch(batch: pa.Table, train_cfg: Optional[TrainTransformConfig],
                     eval_cfg: Optional[EvalTransformConfig], seed: int, epoch: int,
                     on_sample_error: str = "fail", error_log=None) -> Dict[str, Any]:
    epoch += _execution_index() if train_cfg is not None else 0
    image_ids = batch.column("image_id").to_numpy()
    widths, heights = batch.column("width").to_numpy(), batch.column("height").to_numpy()
    file_names = (batch.column("file_name").to_pylist() if "file_name" in batch.column_names
                  else [""] * batch.num_rows)
    encoded = batch.column("image").to_pylist()
    box_offsets, boxes = _flat_lists(batch.column("boxes"), width=4)
    label_offsets, labels = _flat_lists(batch.column("category_ids"))
    _, crowd = _flat_lists(batch.column("iscrowd"))
    columns: Dict[str, list] = {k: [] for k in SAMPLE_KEYS}
    errors: List[str] = []
    for row in range(batch.num_rows):
        width, height, image_id = int(widths[row]), int(heights[row]), int(image_ids[row])
        lo, hi = label_offsets[row], label_offsets[row + 1]
        plan, error = None, ""
        try:
            if train_cfg is not None:
                plan = sample_train_plan(width, height, train_cfg, sample_rng(seed, epoch, image_id))
            else:
                plan = eval_plan(width, height, eval_cfg)
            sample = make_sample(encoded[row], width, height, boxes[box_offsets[row] * 4:box_offsets[row + 1] * 4],
                                 labels[lo:hi], crowd[lo:hi], image_id, plan)
        except Exception as exc:  # any failure of one sample: named, then failed or skipped by policy
            error = _sample_failure(exc, image_id, file_names[row], width, height, train_cfg, seed, epoch, plan)
            if on_sample_error != "skip":
                raise DataError(f"{error} (set data.on_sample_error: skip to leave such samples out)") from exc
            log.warning("skipped %s", error)
            if error_log is not None:
                record = {"image_id": image_id, "file": file_names[row], "epoch": epoch if train_cfg else None,
                          "seed": seed if train_cfg else None, "plan": repr(plan), "error": error}
                stage = "train" if train_cfg is not None else "eval"
                error_log.child(f"{stage}_epoch{epoch:04d}_image{image_id}.json").write_bytes(
                    json.dumps(record).encode())
            sample = {"image": np.zeros((3, 1, 1), np.uint8), "labels": np.zeros(0, np.int64),  # a placeholder
                      "boxes": np.zeros((0, 4), np.float32), "image_id": np.int64(image_id),
                      "orig_size": np.array([height, width], np.int64), "size": np.array([1, 1], np.int64)}
        errors.append(error)
        for key, value in sample.items():
            columns[key].append(value)
    return {
        **columns,
        "image_id": np.asarray(columns["image_id"], dtype=np.int64),
        "orig_size": np.stack(columns["orig_size"]),
        "size": np.stack(columns["size"]),
        # "" for a good sample; the failure for one that on_sample_error=skip left in as a placeholder
        # (rows keep their count, so equal shards and the epoch plan hold; ``collate`` drops them)
        "sample_error": np.asarray(errors, dtype=object),
    }


def _transformed_shards(shards_uri: str, shuffle_seed: Optional[int], batch_size: int, on_sample_error: str,
                        **fn_kwargs: Any):
    """The shards of ``shards_uri`` read in small blocks and mapped through ``_transform_batch``."""
    import ray.data

    if on_sample_error not in SAMPLE_ERROR_POLICIES:
        raise ConfigError(f"data.on_sample_error: one of {', '.join(SAMPLE_ERROR_POLICIES)}, got {on_sample_error!r}")
    manifest = verify_shards(shards_uri)
    locations = shard_locations(shards_uri, manifest)
    if not locations:
        raise DataError(f"{shards_uri}: the manifest lists no shards; re-run `dino ingest`")
    shuffle = None
    if shuffle_seed is not None:
        shuffle = ray.data.FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=True)
    dataset = ray.data.read_parquet([loc.path for loc in locations], filesystem=locations[0].fs,
                                    shuffle=shuffle).select_columns(READ_COLUMNS)
    # The Parquet reader packs files into blocks of up to ~128 MB; one decode task per block would
    # leave cores idle and give streaming_split nothing to divide. Small blocks, streamed:
    return dataset.repartition(target_num_rows_per_block=batch_size).map_batches(
        _transform_batch, batch_format="pyarrow", batch_size=batch_size, zero_copy_batch=True,
        fn_kwargs={**fn_kwargs, "on_sample_error": on_sample_error})


def build_train_dataset(shards_uri: str, transform: TrainTransform, seed: int, *, epoch: int = 0,
                        batch_size: int = MAP_BATCH_SIZE, on_sample_error: str = "fail", error_log=None):
    """A Ray Dataset of augmented training samples from the shard directory ``shards_uri``.

    ``transform``: a TrainTransformConfig, or a mapping accepted by ``transforms.transform_configs``
    (None: the official recipe). ``epoch``: the epoch of the first pass (set it when resuming).
    ``on_sample_error``: ``fail`` raises a ``DataError`` naming the sample (image id, file, epoch,
    seed, plan); ``skip`` leaves it out (a placeholder row with ``sample_error`` set, which
    ``collate`` drops) and writes a JSON record under ``error_log`` (a storage Location) if given.
    """
    cfg = transform if isinstance(transform, TrainTransformConfig) else transform_configs(transform)[0]
    return _transformed_shards(shards_uri, seed, batch_size, on_sample_error, train_cfg=cfg, eval_cfg=None,
                               seed=int(seed), epoch=int(epoch), error_log=error_log)


def build_eval_dataset(shards_uri: str, transform: EvalTransform = None, *, batch_size: int = MAP_BATCH_SIZE,
                       on_sample_error: str = "fail", error_log=None):
    """A Ray Dataset of evaluation samples (deterministic resize) from ``shards_uri``.

    ``transform``: an EvalTransformConfig, or the same mapping given to ``build_train_dataset``.
    ``on_sample_error``/``error_log``: as for ``build_train_dataset``.
    """
    cfg = transform if isinstance(transform, EvalTransformConfig) else transform_configs(transform)[1]
    return _transformed_shards(shards_uri, None, batch_size, on_sample_error, train_cfg=None, eval_cfg=cfg,
                               seed=0, epoch=0, error_log=error_log)


def dataset_size(shards_uri: str) -> int:
    """Number of images (rows) in a shard directory, from its manifest (no data is read)."""
    return read_manifest(shards_uri).images


def _rows_of(batch: Union[Mapping[str, Any], Sequence[Mapping[str, Any]]]) -> List[Mapping[str, Any]]:
    if isinstance(batch, Mapping):
        errors = batch.get("sample_error", [""] * len(batch["image_id"]))
        return [{key: batch[key][i] for key in SAMPLE_KEYS} for i, error in enumerate(errors) if not error]
    return [row for row in batch if not row.get("sample_error")]


def skipped_samples(batch: Mapping[str, Any]) -> List[Tuple[int, str]]:
    """``(image_id, error)`` of the rows of a numpy ``batch`` that ``on_sample_error: skip`` left out."""
    return [(int(i), str(e)) for i, e in zip(batch["image_id"], batch.get("sample_error", ())) if e]


def collate(batch: Union[Mapping[str, Any], Sequence[Mapping[str, Any]]], pad_to_multiple: int = 1,
            mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
            ) -> Tuple[torch.Tensor, torch.Tensor, List[Dict[str, torch.Tensor]]]:
    """Normalise and pad a batch of samples into the model's inputs.

    ``batch``: a numpy batch from ``iter_batches(batch_format="numpy")`` or a list of row dicts;
    rows with a ``sample_error`` (skipped by ``data.on_sample_error: skip``) are left out.
    uint8 images are standardised with ``mean``/``std``; float images are taken as already
    standardised. Returns ``images float32 [B, 3, H, W]`` (zero padding right/bottom to the largest
    picture, rounded up to ``pad_to_multiple``), ``mask bool [B, H, W]`` (True = padding) and one
    target dict per image: ``labels int64 [n]``, ``boxes float32 [n, 4] (cx, cy, w, h) in [0, 1]``
    of the unpadded picture, ``image_id int64 []``, ``orig_size int64 [2]``, ``size int64 [2]``.
    """
    rows = _rows_of(batch)
    if not rows:
        raise ValueError("collate: empty batch (or every sample of it was skipped by data.on_sample_error)")
    shapes = [np.shape(row["image"]) for row in rows]
    height, width = max(s[1] for s in shapes), max(s[2] for s in shapes)
    if pad_to_multiple > 1:
        height = -(-height // pad_to_multiple) * pad_to_multiple
        width = -(-width // pad_to_multiple) * pad_to_multiple
    # assembled in numpy: Ray hands out read-only arrays, which torch.from_numpy warns about
    images = np.zeros((len(rows), 3, height, width), dtype=np.float32)
    mask = np.ones((len(rows), height, width), dtype=bool)
    targets = []
    for i, (row, (_, h, w)) in enumerate(zip(rows, shapes)):
        pixels = np.asarray(row["image"])
        if pixels.dtype == np.uint8:
            normalize_into(images[i, :, :h, :w], pixels, mean, std)
        else:
            images[i, :, :h, :w] = pixels
        mask[i, :h, :w] = False
        targets.append({
            "labels": torch.tensor(np.asarray(row["labels"], dtype=np.int64).reshape(-1)),
            "boxes": torch.tensor(np.asarray(row["boxes"], dtype=np.float32).reshape(-1, 4)),
            "image_id": torch.tensor(int(row["image_id"]), dtype=torch.int64),
            "orig_size": torch.tensor(np.asarray(row["orig_size"], dtype=np.int64)),
            "size": torch.tensor(np.asarray(row["size"], dtype=np.int64)),
        })
    return torch.from_numpy(images), torch.from_numpy(mask), targets
