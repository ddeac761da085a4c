"""The per-worker training loop: a plain PyTorch loop with Ray Train and DeepSpeed at its edges.

Every worker runs ``train_loop_per_worker`` with the driver's ``WorkerInputs``. Ray Train has set
up the process group and hands each worker its shard of the training (and evaluation) dataset;
DeepSpeed owns the optimizer step. Exact resume rests on four things: the data order is
deterministic (ordered, equal shards); each data pass is positioned at the checkpoint's epoch
(data.sharding.OrderedShards); every RNG is seeded per micro-batch from (seed, micro-batch, rank);
and a checkpoint records the step, epoch and micro-batches consumed, so a resumed worker skips
exactly what it already trained on.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from dino_core.distributed import collective_device

from dino_platform import watchdog
from dino_platform.data.batches import iter_collated
from dino_platform.data.transforms import transform_configs
from dino_platform.errors import ConfigError
from dino_platform.evaluation.runner import evaluate_shard
from dino_platform.model.config import build_model
from dino_platform.run_state import (
    STALLS_DIR, WORKER_GROUPS_DIR, TrainState, read_consumed_image_ids, read_state, redeal_needed,
)
from dino_platform.storage import Location
from dino_platform.train.checkpointing import (
    consolidated_optimizer_state, consolidated_state_dict, load_resized_weights, restore_checkpoint, write_checkpoint,
)
from dino_platform.train.config import TrainConfig
from dino_platform.tracking import MetricsLogger, TrackingTarget
from dino_platform.train.engine import build_engine, init_weights, seed_step, set_epoch_lr

log = logging.getLogger("dino.train")


@dataclass(frozen=True)
class EpochPlan:
    """Sizes of a training run at one world size (identical on every rank)."""

    micro_batches_per_epoch: int  # per worker; a multiple of the accumulation steps
    steps_per_epoch: int  # optimizer steps
    total_steps: int  # optimizer steps of the whole run: optim.epochs, capped at optim.max_steps


def plan_epochs(num_train_images: int, cfg: TrainConfig) -> EpochPlan:
    """Micro-batches per worker and optimizer steps per epoch (equal shards, drop_last, whole accumulations)
    for ``cfg`` at one world size (``at_world_size``); with the total batch kept, the same steps at every size."""
    s = cfg.scaling
    micro = num_train_images // s.num_workers // s.batch_size_per_worker
    micro -= micro % s.accumulation_steps
    if micro == 0:
        raise ConfigError(
            f"data.train_uri: {num_train_images} training images are fewer than one optimizer step needs "
            f"(scaling: {s.num_workers} workers x batch {s.batch_size_per_worker} x accumulation "
            f"{s.accumulation_steps})")
    steps_per_epoch = micro // s.accumulation_steps
    total_steps = min(steps_per_epoch * cfg.optim.epochs, cfg.optim.max_steps or math.inf)
    return EpochPlan(micro_batches_per_epoch=micro, steps_per_epoch=steps_per_epoch, total_steps=total_steps)


@dataclass(frozen=True)
class WorkerInputs:
    """Everything a training worker needs besides its dataset shards, built once by the driver
    (``trainer.run_training``) and pickled by Ray Train to every worker of every worker group. Locations
    are resolved on the driver: workers may not share its storage settings (``AWS_*``)."""

    cfg: TrainConfig  # as configured; each worker group fixes it at its own size (at_world_size)
    num_train_images: int  # rows of data.train_uri: sizes every epoch (plan_epochs)
    run_location: Location  # <run.storage_path>/<run.name>: stall reports and worker-group records
    session: str  # the id of one run_training call: tags the stall reports and worker-group records
    tracking: Optional[TrackingTarget] = None  # the MLflow run rank 0 logs to (None: tracking off)
    # data.eval_uri's COCO ground truth {"images", "annotations", "categories"} (None without eval_uri)
    ground_truth: Optional[Dict[str, Any]] = field(default=None, repr=False)
    init_location: Optional[Location] = None  # model.init_from's weights: a run without a checkpoint starts there
    start_location: Optional[Location] = None  # a checkpoint a new run continues from (run_training's start_from)
    image_log: Optional[str] = None  # $DINO_TRAIN_IMAGE_LOG: a folder where each rank logs every step's image ids

    def __post_init__(self) -> None:
        if bool(self.cfg.data.eval_uri) != (self.ground_truth is not None):
            raise ValueError("WorkerInputs: ground_truth (read_ground_truth) goes with data.eval_uri, only with it")
        for world_size in {self.cfg.scaling.min_workers, self.cfg.scaling.max_workers}:
            self.plan(world_size)  # fails on the driver: every size the group may take must make a step

    def plan(self, world_size: int) -> EpochPlan:
        """The run's sizes for a worker group of ``world_size``."""
        return plan_epochs(self.num_train_images, self.cfg.at_world_size(world_size))


def train_loop_per_worker(loop_config: Dict[str, WorkerInputs]) -> None:
    """Ray Train's entry on every worker; ``loop_config`` is ``{"inputs": WorkerInputs}``."""
    inputs = loop_config["inputs"]
    context = ray.train.get_context()
    heartbeat = _TrainHeartbeat(inputs, context.get_world_rank()).start()
    try:
        _train(inputs, context.get_world_rank(), context.get_world_size(), heartbeat)
    finally:
        heartbeat.stop()


def _train(inputs: WorkerInputs, rank: int, world_size: int, heartbeat: "_TrainHeartbeat") -> None:
    """Epochs of micro-batches; after every optimizer step: progress, then evaluation and checkpoint when due."""
    # an elastic group learns its size only here: fix num_workers and the accumulation for it
    cfg = inputs.cfg.at_world_size(world_size)
    plan = inputs.plan(world_size)
    device = ray.train.torch.get_device()
    tracker = MetricsLogger(inputs.tracking) if inputs.tracking is not None and rank == 0 else None
    worker = _set_up(inputs, cfg, rank, world_size, device, heartbeat)
    engine, criterion, state = worker.engine, worker.criterion, worker.state
    if rank == 0:
        _record_worker_group(inputs, world_size, worker, tracker)

    train_shard = heartbeat.shard = ray.train.get_dataset_shard("train")
    evaluator = _Evaluator(cfg, worker.postprocessor, ray.train.get_dataset_shard("eval"), inputs.ground_truth,
                           tracker, device) if cfg.data.eval_uri else None
    progress = _Progress(world_size, cfg.scaling.batch_size_per_worker)
    consumed = _ConsumedImages(worker.consumed_before, inputs.image_log, rank, world_size)
    if state.step >= plan.total_steps and not worker.own_checkpoint:  # started from a finished run's checkpoint
        _evaluate_and_checkpoint(engine, state, cfg, {}, None, True, consumed, heartbeat)
    redeal = worker.redeal
    while state.step < plan.total_steps:
        set_epoch_lr(engine.optimizer, worker.base_lrs, cfg.optim, state.epoch)
        engine.train()
        # after a resize the first pass holds only the epoch's remaining images (data.sharding)
        batches = _train_batches(train_shard, cfg, plan, skip=state.batches_in_epoch,
                                 first_index=state.batches_in_epoch if redeal else 0)
        redeal = False
        epoch_started = state.epoch
        waiting = f"epoch {state.epoch}: waiting for micro-batch"
        for images, mask, targets in watchdog.watched(batches, heartbeat, waiting):
            progress.batch_arrived()
            heartbeat.phase(f"train step {state.step + 1} (micro-batch {state.batches_in_epoch})")
            seed_step(state.seed, state.epoch * plan.micro_batches_per_epoch + state.batches_in_epoch, rank)
            consumed.add(targets)
            loss, losses = _train_step(engine, criterion, images, mask, targets, device)
            progress.add_micro_batch(loss, losses)
            if not count_micro_batch(state, cfg.scaling.accumulation_steps):
                continue

            heartbeat.step_done()
            consumed.step_done(state)
            end_of_epoch = end_epoch_if_complete(state, plan)
            if end_of_epoch:
                consumed.new_epoch()
            finished = state.step >= plan.total_steps
            metrics = progress.report_if_due(state, engine, cfg.tracking.log_every_n_steps,
                                             force=end_of_epoch or finished)
            if metrics and tracker is not None:
                tracker.log_metrics(metrics, step=state.step)
            evaluate, checkpoint = due_after_step(cfg, state, end_of_epoch, finished)
            _evaluate_and_checkpoint(engine, state, cfg, metrics or {}, evaluator if evaluate else None, checkpoint,
                                     consumed, heartbeat)
            progress.mark()
            if finished:
                break
        if state.step < plan.total_steps and state.epoch == epoch_started:
            raise RuntimeError(f"rank {rank}: the training shard ended after {state.batches_in_epoch} of "
                               f"{plan.micro_batches_per_epoch} planned micro-batches in epoch {state.epoch}")


@dataclass
class _Worker:
    """What setup built on this worker, and where its training continues."""

    engine: Any  # the DeepSpeed engine around the model
    base_lrs: List[float]  # each optimizer group's learning rate before the schedule
    criterion: Any
    postprocessor: Any
    state: TrainState  # step, epoch and position to continue from (step 0 on a fresh start)
    saved: Optional[TrainState]  # the restored checkpoint's state as written (None: a fresh start)
    consumed_before: List[int]  # the current epoch's image ids trained on before this group started
    own_checkpoint: bool  # restored from this run's own checkpoint (not a start_location)
    redeal: bool  # the epoch's remaining images are re-dealt over this group (data.sharding)


def _set_up(inputs: WorkerInputs, cfg: TrainConfig, rank: int, world_size: int, device,
            heartbeat: "_TrainHeartbeat") -> _Worker:
    """Build the model and the DeepSpeed engine and restore the run's latest checkpoint, else the one
    it starts from (``start_location``), else load ``model.init_from`` (or keep the seeded init)."""
    heartbeat.phase("building model")
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank and in every run
    model, criterion, postprocessor = build_model(cfg.model)
    checkpoint = ray.train.get_checkpoint()
    own_checkpoint = checkpoint is not None
    if checkpoint is None and inputs.start_location is not None:
        # a new run continuing another run's checkpoint (e.g. a PBT trial cloning a better one)
        start = inputs.start_location
        checkpoint = ray.train.Checkpoint(path=start.path, filesystem=start.fs)
        if rank == 0:
            log.info("starting from %s", start.uri)
    elif checkpoint is None and cfg.model.init_from:
        init_weights(model, cfg.model, inputs.init_location)

    state = TrainState(seed=cfg.run.seed, world_size=world_size)
    saved: Optional[TrainState] = None
    consumed_before: List[int] = []
    heartbeat.phase("restoring checkpoint" if checkpoint is not None else "building DeepSpeed engine")
    with (checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext()) as path:
        directory = Path(path) if path is not None else None
        if directory is not None:
            saved = read_state(directory)
            if saved.world_size not in (0, world_size):  # a resize: DeepSpeed's partitions do not fit
                load_resized_weights(model, directory)
        model.to(device)
        criterion.to(device)
        engine, base_lrs = build_engine(model, cfg)
        if directory is not None:
            # the optimizer state restores each group's weight decay; this run's config decides it
            decay = [group["weight_decay"] for group in engine.optimizer.param_groups]
            state = restore_checkpoint(engine, directory, world_size, cfg.scaling.accumulation_steps)
            for group, value in zip(engine.optimizer.param_groups, decay):
                group["weight_decay"] = value
            consumed_before = read_consumed_image_ids(directory, state.epoch)
    return _Worker(engine, base_lrs, criterion, postprocessor, state, saved, consumed_before, own_checkpoint,
                   redeal=saved is not None and redeal_needed(saved, world_size))


def _train_step(engine, criterion, images, mask, targets, device) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Forward, loss and backward of one micro-batch (to a GPU through pinned memory, without waiting for the
    copy); DeepSpeed steps the optimizer at an accumulation's last. Returns the 0-d total loss and the terms."""
    device = torch.device(device)

    def move(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor.to(device)

    images, mask = move(images), move(mask)
    targets = [{k: (move(v) if isinstance(v, torch.Tensor) else v) for k, v in t.items()} for t in targets]
    outputs = engine(images, mask, targets)
    losses = criterion(outputs, targets)
    loss = criterion.total_loss(losses)
    engine.backward(loss)
    engine.step()
    return loss, losses


def _train_batches(shard, cfg: TrainConfig, plan: EpochPlan, skip: int, first_index: int = 0) -> Iterator[Tuple]:
    """This epoch's micro-batches on this worker, after the first ``skip`` (already trained on).
    ``first_index``: the epoch position of the shard's first batch (a re-dealt remainder starts at ``skip``)."""
    train_transform, _ = transform_configs(cfg.data.transform)
    batches = iter_collated(shard, batch_size=cfg.scaling.batch_size_per_worker, drop_last=True,
                            normalization=(train_transform.mean, train_transform.std))
    for index, batch in enumerate(batches, start=first_index):
        # beyond the plan: too few to fill an accumulation. Still drained, so the pass completes
        # and Ray Data counts it (the next pass draws the next epoch's augmentation and order).
        if skip <= index < plan.micro_batches_per_epoch:
            yield batch


def count_micro_batch(state: TrainState, accumulation_steps: int) -> bool:
    """Count one trained micro-batch in ``state``; True when it completed an optimizer step."""
    state.batches_in_epoch += 1
    if state.batches_in_epoch % accumulation_steps:
        return False
    state.step, state.steps_in_epoch = state.step + 1, state.steps_in_epoch + 1
    return True


def end_epoch_if_complete(state: TrainState, plan: EpochPlan) -> bool:
    """After an optimizer step: move ``state`` to the next epoch once its micro-batches are all trained (True)."""
    if state.batches_in_epoch != plan.micro_batches_per_epoch:
        return False
    state.epoch, state.batches_in_epoch, state.steps_in_epoch = state.epoch + 1, 0, 0
    state.epoch_redealt = False
    return True


def due_after_step(cfg: TrainConfig, state: TrainState, end_of_epoch: bool, finished: bool) -> Tuple[bool, bool]:
    """(evaluate, checkpoint) after an optimizer step, ``state`` counted past it: both at the run's last
    step; evaluation (with ``data.eval_uri``) every ``eval.every_n_epochs`` epochs; checkpoints every
    ``checkpoint.every_n_steps`` steps and every ``checkpoint.every_n_epochs`` epochs."""
    def epoch_due(n: Optional[int]) -> bool:
        return end_of_epoch and n is not None and state.epoch % n == 0

    c = cfg.checkpoint
    step_due = c.every_n_steps is not None and state.step % c.every_n_steps == 0
    evaluate = bool(cfg.data.eval_uri) and (finished or epoch_due(cfg.eval.every_n_epochs))
    return evaluate, finished or step_due or epoch_due(c.every_n_epochs)


def _evaluate_and_checkpoint(engine, state: TrainState, cfg: TrainConfig, metrics: Dict[str, float],
                             evaluator: Optional["_Evaluator"], checkpoint: bool, consumed: "_ConsumedImages",
                             heartbeat: "_TrainHeartbeat") -> None:
    """Every rank (consolidating the state and gathering the consumed image ids are collectives): evaluate
    with ``evaluator`` when given, then checkpoint when ``checkpoint``; scores without a checkpoint go to
    Ray Train's report alone."""
    metrics = {**metrics, "step": state.step, "epoch": state.epoch}
    model_state = None
    if evaluator is not None:
        heartbeat.phase(f"evaluating at step {state.step}")
        started = time.monotonic()
        model_state = consolidated_state_dict(engine)
        # eval/AP etc. go into Ray Train's report too (a Tune sweep schedules on them)
        metrics.update(evaluator.run(model_state, state.step))
        heartbeat.evaluation_done(time.monotonic() - started)
    if not checkpoint:
        if model_state is not None:
            ray.train.report(metrics)
        return
    heartbeat.phase(f"checkpointing at step {state.step}")
    model_state = model_state if model_state is not None else consolidated_state_dict(engine)
    optimizer_state = consolidated_optimizer_state(engine)
    image_ids = consumed.gather()
    if ray.train.get_context().get_world_rank() != 0:
        model_state = optimizer_state = None  # rank 0 writes the consolidated files
    with tempfile.TemporaryDirectory(prefix="dino-ckpt-") as staging:
        write_checkpoint(engine, Path(staging), state, model_state, cfg.to_dict(), optimizer_state, image_ids)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(staging),
                         checkpoint_dir_name=f"checkpoint_step{state.step:07d}")


class _TrainHeartbeat(watchdog.Heartbeat):
    """The worker's stall watchdog; a stall's report, with the training shard's stats, goes to ``<run>/stalls/``.
    Timeout: ``run.stall_timeout_s`` when set; else the larger of the default and 20 median step times,
    and at least twice the longest evaluation measured (an evaluation is one phase without beats)."""

    def __init__(self, inputs: WorkerInputs, rank: int):
        self.configured = inputs.cfg.run.stall_timeout_s
        self.step_times: List[float] = []
        self.longest_evaluation = 0.0
        self.last_step = None
        self.shard = None  # the training data shard, once the loop holds it (its stats go in a report)
        self.rank = rank

        def sink(report: str) -> None:
            name = f"{STALLS_DIR}/{inputs.session}-{time.time_ns()}-rank{rank}.txt"
            inputs.run_location.child(name).write_bytes(report.encode())

        super().__init__(f"training worker rank {rank}", self.timeout, watchdog.exit_process(sink), self.data_stats)

    def timeout(self) -> float:
        sized = max(watchdog.stall_timeout(None, self.step_times), 2 * self.longest_evaluation)
        return sized if self.configured is None else float(self.configured)

    def data_stats(self) -> str:
        if self.shard is None:
            return "training data pipeline: not requested yet"
        return f"training data pipeline (rank {self.rank}'s shard):\n{self.shard.stats()}"

    def step_done(self) -> None:
        now = time.monotonic()
        if self.last_step is not None:
            self.step_times = (self.step_times + [now - self.last_step])[-50:]
        self.last_step = now
        self.beat()

    def evaluation_done(self, seconds: float) -> None:
        self.longest_evaluation = max(self.longest_evaluation, seconds)
        self.last_step = None  # the next step's time does not include the evaluation


class _Progress:
    """Loss terms averaged over workers and micro-batches; throughput since the last report.

    The terms are summed as tensors where they were computed (reading one would wait for the GPU at
    every micro-batch); only a report step copies them to the host. A report also gives the share of
    the time spent waiting for data (``data_wait_fraction``) and, on a GPU, ``peak_gpu_memory_gib``.
    """

    MAIN_TERMS = ("loss_ce", "loss_bbox", "loss_giou", "loss_ce_dn", "loss_bbox_dn", "loss_giou_dn",
                  "loss_ce_interm", "loss_bbox_interm", "loss_giou_interm")

    def __init__(self, world_size: int, batch_size: int):
        self.world_size, self.batch_size = world_size, batch_size
        self._reset()

    def _reset(self) -> None:
        self.sums: Dict[str, torch.Tensor] = {}
        self.micro_batches, self.steps, self.busy, self.data_wait = 0, 0, 0.0, 0.0
        self.mark()

    def mark(self) -> None:
        """Start timing from now: evaluation and checkpoint time stay out of the throughput."""
        self.last = time.perf_counter()

    def batch_arrived(self) -> None:
        """The loop holds its next micro-batch: the time since the last mark was spent waiting for it."""
        self.data_wait += time.perf_counter() - self.last

    def add_micro_batch(self, loss: torch.Tensor, losses: Dict[str, torch.Tensor]) -> None:
        now = time.perf_counter()
        self.busy += now - self.last  # data loading + forward + backward + optimizer step
        self.last = now
        names = ["loss", *(name for name in self.MAIN_TERMS if name in losses)]
        values = torch.stack([loss, *(losses[name] for name in names[1:])]).detach().to(torch.float64)
        if list(self.sums) == names:  # one stacked add per micro-batch, not one per term
            values = values + torch.stack(list(self.sums.values()))
        self.sums = dict(zip(names, values))
        self.micro_batches += 1

    def mean_over_workers(self) -> Dict[str, float]:
        """The loss terms' mean over this report's micro-batches and all workers (a collective)."""
        names = sorted(self.sums)
        values = torch.stack([self.sums[n] for n in names]).to(collective_device()) / self.micro_batches
        if dist.is_initialized():
            dist.all_reduce(values)
            values /= dist.get_world_size()
        return dict(zip(names, values.tolist()))

    def report_if_due(self, state: TrainState, engine, every: int, force: bool) -> Optional[Dict[str, float]]:
        """All ranks call this at every optimizer step; on report steps it is a collective."""
        self.steps += 1
        if not (force or state.step % every == 0):
            return None
        metrics = self.mean_over_workers()
        elapsed = max(self.busy, 1e-9)
        metrics.update({
            "lr": float(engine.optimizer.param_groups[0]["lr"]),
            "steps_per_s": self.steps / elapsed,
            "images_per_s": self.micro_batches * self.batch_size * self.world_size / elapsed,
            "world_size": float(self.world_size),
            "data_wait_fraction": self.data_wait / elapsed,
        })
        if torch.cuda.is_available():  # the allocator's counter: no device sync
            metrics["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if not all(math.isfinite(v) for v in metrics.values()):
            raise FloatingPointError(f"step {state.step}: non-finite training metrics {metrics}")
        ray.train.report({**metrics, "step": state.step, "epoch": state.epoch})
        if ray.train.get_context().get_world_rank() == 0:
            log.info("step %d epoch %d | loss %.4f lr %.2e | %.2f steps/s %.1f img/s", state.step, state.epoch,
                     metrics["loss"], metrics["lr"], metrics["steps_per_s"], metrics["images_per_s"])
        self._reset()
        return metrics


class _ConsumedImages:
    """The image ids of the current epoch this worker trained on, for the checkpoint's data position.
    ``before``: the epoch's ids from the checkpoint this group resumed from (every rank holds them; rank 0
    writes them with the gathered new ones). ``log_dir`` (``$DINO_TRAIN_IMAGE_LOG``, an audit of the data
    semantics): each rank appends one JSON line per optimizer step with its image ids."""

    def __init__(self, before: List[int], log_dir: Optional[str], rank: int, world_size: int):
        self.before, self.mine, self.pending = list(before), [], []
        self.log_file, self.line = None, {}
        if log_dir:
            # one id for this worker group on every rank: the audit tells attempts apart by it
            group = [{"id": uuid.uuid4().hex, "started_ns": time.time_ns()}]
            if dist.is_initialized():
                dist.broadcast_object_list(group, src=0)
            self.line = {"group": group[0]["id"], "group_started_ns": group[0]["started_ns"], "rank": rank,
                         "world_size": world_size}  # what every line of this rank's log holds
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self.log_file = Path(log_dir) / f"group{group[0]['started_ns']}-rank{rank}.jsonl"

    def add(self, targets) -> None:
        self.pending.extend(int(t["image_id"]) for t in targets)

    def step_done(self, state: TrainState) -> None:
        if self.log_file is not None:
            line = {**self.line, "step": state.step, "epoch": state.epoch, "image_ids": self.pending}
            with self.log_file.open("a") as out:
                out.write(json.dumps(line) + "\n")
        self.mine.extend(self.pending)
        self.pending = []

    def new_epoch(self) -> None:
        self.before, self.mine = [], []

    def gather(self) -> List[int]:
        """Every rank: the epoch's ids trained on by all ranks so far (a collective)."""
        if not dist.is_initialized():
            return self.before + self.mine
        everyone: List[Optional[List[int]]] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, self.mine)
        return self.before + [i for ids in everyone for i in ids]


def _record_worker_group(inputs: WorkerInputs, world_size: int, worker: _Worker, tracker) -> None:
    """Rank 0: note this worker group's start (size, step, the size it resized from) in the log, in the
    run directory and in MLflow; the driver counts restarts and resizes from these records. Then warn
    when the group's reservations leave no node a whole CPU for the data pipeline."""
    state, saved = worker.state, worker.saved
    resized_from = saved.world_size if saved is not None and saved.world_size not in (0, world_size) else None
    metrics = {"world_size": world_size}
    if saved is not None:
        log.info("resumed at step %d (epoch %d, %d steps in) with %d workers%s", state.step, state.epoch,
                 state.steps_in_epoch, world_size,
                 f" (checkpoint written by {saved.world_size}; the epoch's remaining images re-dealt)"
                 if worker.redeal else "")
        metrics["resumed_from_step"] = state.step
    if resized_from is not None:
        log.info("resized %d -> %d workers at step %d", resized_from, world_size, state.step)
        metrics.update({"resize/from_workers": resized_from, "resize/to_workers": world_size})
    if tracker is not None:
        tracker.log_metrics(metrics, step=state.step)
    record = {"session": inputs.session, "step": state.step, "world_size": world_size,
              "resumed": saved is not None, "resized_from": resized_from, "time_ns": time.time_ns()}
    name = f"{WORKER_GROUPS_DIR}/start-{record['time_ns']}.json"
    inputs.run_location.child(name).write_bytes(json.dumps(record).encode())
    hint = (f"Workers hold scaling.cpus_per_worker={inputs.cfg.scaling.cpus_per_worker:g} each; lower it, "
            "or keep training workers off one node, so it keeps a whole CPU free.")
    diagnosis = watchdog.data_pipeline_starvation(watchdog.free_cpus_per_node(), hint)
    if diagnosis:
        log.warning("%s The stall watchdog fails the attempt after run.stall_timeout_s if the data does not arrive.",
                    diagnosis)


class _Evaluator:
    """Evaluation during training: a plain fp32 copy of the model per worker, COCO AP on rank 0."""

    def __init__(self, cfg: TrainConfig, postprocessor, shard, ground_truth, tracker, device):
        self.cfg, self.postprocessor, self.shard, self.ground_truth = cfg, postprocessor, shard, ground_truth
        self.tracker, self.device = tracker, device
        self.model = None

    def run(self, model_state: Dict[str, torch.Tensor], step: int) -> Dict[str, float]:
        """Evaluate on every rank together; rank 0 returns the summary COCO stats (``eval/AP`` ...), others {}."""
        if self.model is None:
            self.model, _, _ = build_model(self.cfg.model)
            self.model.to(self.device)
        self.model.load_state_dict(model_state)
        self.model.eval()
        _, eval_transform = transform_configs(self.cfg.data.transform)
        result = evaluate_shard(self.model, self.postprocessor, self.shard, self.ground_truth,
                                batch_size=self.cfg.eval.batch_size,
                                protocol=self.cfg.eval.protocol(num_select=int(self.postprocessor.num_select)),
                                num_drawn=self.cfg.eval.num_logged_images if self.tracker else 0,
                                draw_threshold=self.cfg.eval.logged_score_threshold,
                                normalization=(eval_transform.mean, eval_transform.std))
        if result is None:
            return {}  # not rank 0
        log.info("eval at step %d: AP %.4f AP50 %.4f (%d images)", step, result.coco.stats["AP"],
                 result.coco.stats["AP50"], result.coco.num_images)
        if self.tracker is not None:
            result.log_to(self.tracker, step)
        return {f"eval/{k}": float(v) for k, v in result.coco.stats.items()}
