"""Running a sweep: a Ray Tune ``Tuner`` whose trials each train a ``TorchTrainer`` (Ray Train V2).

Train V2 accepts no trainer as a Tune trainable: a trial is a function that ``fit()``s one itself
(``train.trainer.run_training``), and ``sweep.reporting`` re-reports rank 0's reports to Tune with a
pointer to the newest training checkpoint. ASHA stops trials on them; PBT clones the best trials'
latest checkpoint into the worst with perturbed hyper-parameters (``trial_run``). A trial's workers
ask for ``train.scaling``'s resources; the trial process itself holds only ``budget.trial_cpus``.

MLflow: one parent run for the sweep; each trial's training run is created beforehand with
``mlflow.parentRunId`` (so it nests) and the training job continues it (found by its run key).
Re-running a sweep resumes ``<output_root>/<name>`` with ``Tuner.restore``; the best trial's latest
evaluated checkpoint is then evaluated and registered by the evaluate and register stages' functions.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from dino_platform.errors import DataError
from dino_platform.pipeline.spec import DatasetSpec, SynthSpec
from dino_platform.pipeline.stages.evaluate import evaluate_checkpoint
from dino_platform.pipeline.stages.ingest import ingest_dataset
from dino_platform.pipeline.stages.register import register_checkpoint
from dino_platform.ray_session import connect
from dino_platform.registry.models import git_commit
from dino_platform.storage import resolve
from dino_platform.sweep.reporting import CHECKPOINT_KEY, fit_and_report, read_pointer
from dino_platform.sweep.spec import SweepSpec, apply_values
from dino_platform.tracking import find_or_create_run, resolve_tracking_uri, start_or_resume_run
from dino_platform.train.config import flat_params, load_config

log = logging.getLogger("dino.sweep")

TRIAL_TAG = "dino.sweep_trial"
CLONED_FROM_TAG = "dino.cloned_from_trial"  # PBT: the trial whose checkpoint this training run continued
RESULT_FILE = "sweep_result.json"  # <sweep dir>/: the last run's trials, best trial, evaluation, registry decision


class SweepInterrupted(Exception):
    """The sweep stopped before its trials finished (its state is saved; re-running resumes it)."""


@dataclass
class TrialSummary:
    trial_id: str
    config: Dict[str, Any]
    epochs: int  # epochs completed (the last reported ``epoch``)
    best_metric: Optional[float]  # best scheduler metric over its evaluations
    checkpoint: Optional[str]  # latest checkpoint that carried the scheduler metric
    checkpoint_metric: Optional[float]
    status: str


@dataclass
class SweepOutcome:
    sweep_dir: str
    parent_run_id: str
    tracking_uri: str
    trials: List[TrialSummary]
    best: Optional[TrialSummary]
    evaluation: Optional[Dict[str, float]]
    registration: Optional[Dict[str, Any]]
    restored: bool

    def summary(self) -> str:
        lines = [f"sweep {self.sweep_dir}: {len(self.trials)} trials{' (restored)' if self.restored else ''}; "
                 f"MLflow parent run {self.parent_run_id}"]
        for t in self.trials:
            lines.append(f"  {t.trial_id}: {t.status}, {t.epochs} epochs, best {t.best_metric}, {t.config}")
        if self.best is not None:
            lines.append(f"best trial {self.best.trial_id}: checkpoint {self.best.checkpoint}")
        if self.registration is not None:
            lines.append(f"registry: {self.registration['decision']}")
        return "\n".join(lines)


def run_sweep(spec: SweepSpec) -> SweepOutcome:
    """Run (or resume) the sweep, then evaluate and register its best checkpoint."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining
    from ray.tune.search import BasicVariantGenerator

    # progress reports between evaluations carry no eval/AP: only the scheduler needs it (ASHA skips those)
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    connect(**spec.ray)  # a local instance keeps the dashboard on: stopped trials give their CPUs back
    _prepare_synthetic_data(spec)
    local = Path(spec.sweep_dir) if "://" not in spec.sweep_dir else Path("runs") / spec.name
    tracking_uri = resolve_tracking_uri(spec.tracking_uri, local)
    parent_run_id = _parent_run(spec, tracking_uri)
    storage = resolve(spec.output_root)
    base = spec.base_config()  # its locations made absolute: a Tune trial runs in its own working directory
    train = apply_values(spec.train, {key: resolve(uri).uri for key, uri in (
        ("data.train_uri", base.data.train_uri), ("data.eval_uri", base.data.eval_uri),
        ("model.init_from", base.model.init_from)) if uri})
    trainable = tune.with_resources(
        partial(train_trial, train=train, trials_root=resolve(f"{spec.sweep_dir}/trials").uri, tracking_uri=tracking_uri,
                experiment=spec.experiment, parent_run_id=parent_run_id),
        {"cpu": spec.budget.trial_cpus})
    sweep_location = storage.child(spec.name)
    restore_path = sweep_location.uri if "://" in sweep_location.uri else str(Path(sweep_location.path).resolve())
    restored = tune.Tuner.can_restore(restore_path, storage_filesystem=storage.fs)
    if restored:
        log.info("sweep %s: resuming the experiment found at %s", spec.name, restore_path)
        tuner = tune.Tuner.restore(restore_path, trainable=trainable, resume_errored=True,
                                   storage_filesystem=storage.fs)
    else:
        s = spec.scheduler
        if s.kind == "asha":
            # stop_last_trials=False: a trial reaching max_t ends by itself; stopping it on the progress report
            # of its last epoch would cut it off before its final evaluation and checkpoint
            scheduler = ASHAScheduler(time_attr="epoch", max_t=spec.max_epochs, grace_period=s.grace_period,
                                      reduction_factor=s.reduction_factor, stop_last_trials=False)
        elif s.kind == "pbt":
            # require_attrs=False: progress reports between evaluations carry no eval/AP; PBT acts on
            # the epoch-end reports, which carry the metric and the checkpoint it clones
            scheduler = PopulationBasedTraining(
                time_attr="epoch", perturbation_interval=s.perturbation_interval, burn_in_period=s.grace_period,
                hyperparam_mutations=spec.pbt_mutations(), quantile_fraction=s.quantile_fraction,
                resample_probability=s.resample_probability, synch=s.synch, require_attrs=False)
        else:
            scheduler = FIFOScheduler()
        tuner = tune.Tuner(
            trainable,
            param_space={key: domain.to_tune() for key, domain in spec.search_space.items()},
            tune_config=tune.TuneConfig(metric=s.metric, mode=s.mode, scheduler=scheduler,
                                        num_samples=spec.budget.num_samples,
                                        max_concurrent_trials=spec.budget.max_concurrent,
                                        search_alg=BasicVariantGenerator(random_state=spec.budget.seed,
                                                                                    max_concurrent=spec.budget.max_concurrent)),
            # Tune's checkpoints are pointers (a few bytes each) to the training checkpoints
            run_config=tune.RunConfig(name=spec.name, storage_path=storage.path, storage_filesystem=storage.fs,
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=2)),
        )
    results = tuner.fit()
    # Tune returns normally on SIGINT/SIGUSR1, and stopping the running trials on its way out marks them
    # TERMINATED in memory; the experiment state it saved just before that still says which ones ran
    saved = tune.ExperimentAnalysis(restore_path, storage_filesystem=storage.fs)
    unfinished = [t.trial_id for t in saved.trials if t.status not in ("TERMINATED", "ERROR")]
    if unfinished:
        _close_parent(tracking_uri, parent_run_id, "KILLED")
        raise SweepInterrupted(f"sweep {spec.name}: interrupted with trial(s) {', '.join(unfinished)} unfinished; "
                               f"nothing was evaluated or registered. Run the same command again to resume it "
                               f"from {restore_path}")
    trials = [_summarise(result, spec) for result in results]
    best = _best(trials, spec.scheduler.mode)
    outcome = SweepOutcome(sweep_dir=spec.sweep_dir, parent_run_id=parent_run_id, tracking_uri=tracking_uri,
                           trials=trials, best=best, evaluation=None, registration=None, restored=restored)
    if best is None:
        _close_parent(tracking_uri, parent_run_id, "FAILED")
        raise DataError(f"sweep {spec.name}: no trial produced a checkpoint with {spec.scheduler.metric}; "
                        f"see the trial logs under {spec.sweep_dir}")
    if spec.register.enabled:
        outcome.evaluation, outcome.registration = evaluate_and_register(spec, best, tracking_uri, parent_run_id)
    _close_parent(tracking_uri, parent_run_id, "FINISHED", trials, best)
    resolve(spec.sweep_dir).child(RESULT_FILE).write_bytes(json.dumps(asdict(outcome), indent=1).encode())
    log.info("%s", outcome.summary())
    return outcome



def train_trial(values: Dict[str, Any], train: Dict[str, Any], trials_root: str, tracking_uri: str,
                experiment: str, parent_run_id: str) -> None:
    """Train one sampled configuration (or continue one, see ``trial_run``); reports reach Tune as they come."""
    from ray import tune

    from dino_platform.train.trainer import run_training

    trial_id = tune.get_context().get_trial_id()
    pointer = read_pointer(tune.get_checkpoint())
    run_name, start_from = trial_run(trial_id, pointer)
    raw = apply_values(train, values)
    raw["run"] = {**(raw.get("run") or {}), "name": run_name, "storage_path": trials_root}
    raw["tracking"] = {**(raw.get("tracking") or {}), "tracking_uri": tracking_uri, "experiment": experiment,
                       "enabled": True}
    cfg = load_config(raw)
    run_key = resolve(trials_root).child(cfg.run.name).uri  # the key run_training's tracking looks up
    lineage = {} if start_from is None else {CLONED_FROM_TAG: pointer["trial_id"], "dino.started_from": start_from}
    if start_from is not None:
        log.info("trial %s: continuing trial %s's checkpoint %s with %s", trial_id, pointer["trial_id"], start_from, values)
    # the trial's MLflow run, nested under the sweep's (once); the training job then continues it
    tags = {"mlflow.parentRunId": parent_run_id, TRIAL_TAG: trial_id, **lineage,
            **{f"sweep.{k}": str(v) for k, v in values.items()}}
    find_or_create_run(tracking_uri, experiment, run_key, cfg.run.name, flat_params(cfg), cfg.to_yaml(), tags)
    fit_and_report(lambda callbacks: run_training(cfg, callbacks=callbacks, start_from=start_from),
                   trial_id, run_name, trials_root)


def trial_run(trial_id: str, pointer: Optional[Dict[str, Any]]):
    """(training run name, checkpoint URI to start from) for a trial that (re)starts with ``pointer``.

    No pointer: a fresh trial, ``trial_<id>``. Its own pointer (Tune restarted it after an error or
    a ``Tuner.restore``): the run that wrote it, which Ray Train resumes from its own storage.
    Another trial's pointer (PBT exploit): a new run, named after its origin, that starts from it.
    """
    if pointer is None or pointer["trial_id"] == trial_id:
        return (pointer or {}).get("run_name") or f"trial_{trial_id}", None
    return f"trial_{trial_id}_from_{pointer['trial_id']}_step{int(pointer['step']):07d}", pointer["uri"]



def _summarise(result, spec: SweepSpec) -> TrialSummary:
    metric = spec.scheduler.metric
    frame = result.metrics_dataframe
    rows = frame.to_dict("records") if frame is not None else []
    evaluated = [r for r in rows if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
    last = next((r for r in reversed(evaluated) if r.get(CHECKPOINT_KEY)), None)
    best_metric = (max if spec.scheduler.mode == "max" else min)((r[metric] for r in evaluated), default=None)
    trial_id = str((result.metrics or {}).get("trial_id") or Path(result.path).name)
    return TrialSummary(
        trial_id=trial_id, config=dict(result.config or {}),
        epochs=int(max((r.get("epoch") or 0 for r in rows), default=0)),
        best_metric=best_metric,
        checkpoint=last[CHECKPOINT_KEY] if last else None,
        checkpoint_metric=float(last[metric]) if last else None,
        status="ERROR" if result.error else "TERMINATED")


def _best(trials: List[TrialSummary], mode: str) -> Optional[TrialSummary]:
    """The trial whose latest kept checkpoint scored best (the checkpoint that will be registered)."""
    candidates = [t for t in trials if t.checkpoint and t.checkpoint_metric is not None]
    return (max if mode == "max" else min)(candidates, key=lambda t: t.checkpoint_metric, default=None)


def evaluate_and_register(spec: SweepSpec, best: TrialSummary, tracking_uri: str, parent_run_id: str):
    """The pipelines' gate, with the evaluate and register stages' functions: COCO evaluation under the
    training config's ``eval`` section (its own MLflow run) -> registry version -> alias if better."""
    base = spec.base_config()
    data_uri = spec.register.eval_data or base.data.eval_uri
    if not data_uri:
        raise DataError("register.eval_data: no evaluation data (set it or train.data.eval_uri)")
    evaluation = evaluate_checkpoint(
        best.checkpoint, data_uri, base.eval, tracking_uri, spec.experiment, f"evaluate-best-{best.trial_id}",
        {"mlflow.parentRunId": parent_run_id, "checkpoint": best.checkpoint, "data": data_uri,
         "dino.sweep_stage": "evaluate", TRIAL_TAG: best.trial_id},
        workers=spec.register.eval_workers, cpus_per_worker=spec.register.eval_cpus_per_worker)
    tags = {"sweep": spec.name, "sweep_run": parent_run_id, "sweep_trial": best.trial_id, "git_commit": git_commit(),
            **{f"sweep.{k}": str(v) for k, v in best.config.items()}}
    registration = register_checkpoint(tracking_uri, spec.register.model_name, spec.register.alias, evaluation,
                                       data_uri, tags)
    return evaluation["metrics"], {**asdict(registration), "eval_run_id": evaluation["run_id"]}



def _parent_run(spec: SweepSpec, tracking_uri: str) -> str:
    """The sweep's MLflow run, keyed by the sweep directory (found again when the sweep resumes)."""
    params = {"scheduler": spec.scheduler.kind, "metric": spec.scheduler.metric,
              "num_samples": str(spec.budget.num_samples), "max_concurrent": str(spec.budget.max_concurrent)}
    sweep = {"search_space": {k: {d.kind: list(d.values)} for k, d in spec.search_space.items()},
             "scheduler": spec.scheduler.__dict__, "budget": spec.budget.__dict__, "train": spec.train}
    artifacts = Path(spec.sweep_dir) / "mlartifacts" if "://" not in spec.sweep_dir else None
    return start_or_resume_run(tracking_uri, spec.experiment, resolve(spec.sweep_dir).uri, spec.name, params,
                               yaml.safe_dump(sweep, sort_keys=False), artifacts).run_id


def _close_parent(tracking_uri: str, run_id: str, status: str, trials: Optional[List[TrialSummary]] = None,
                  best: Optional[TrialSummary] = None) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    if trials is not None:
        client.log_dict(run_id, {"trials": [t.__dict__ for t in trials]}, "trials.json")
        client.set_tag(run_id, "num_trials", str(len(trials)))
    if best is not None:
        client.set_tag(run_id, "best_trial", best.trial_id)
        client.set_tag(run_id, "best_checkpoint", best.checkpoint)
        client.log_metric(run_id, "best_metric", float(best.checkpoint_metric))
    client.set_terminated(run_id, status=status)


def _prepare_synthetic_data(spec: SweepSpec) -> None:
    """Smoke presets: synthetic COCO-like images, ingested (as an ingest stage does) where train.data
    points when it holds no shards yet."""
    data = spec.train.get("data") or {}
    targets = {"train": data.get("train_uri"), "val": data.get("eval_uri")}
    for split, options in (spec.synth or {}).items():
        if split not in targets or not targets[split]:
            raise DataError(f"synth.{split}: expected train or val, each with train.data.train_uri/eval_uri set")
        if resolve(targets[split]).child("manifest.json").exists():
            continue
        synth = SynthSpec(kind="coco", images=int(options.get("images", 8)), seed=int(options.get("seed", 0)),
                          size=list(options.get("size", (128, 96))))
        ingest_dataset(DatasetSpec(synth=synth, shard_size=int(options.get("shard_size", 8))), targets[split],
                       f"{spec.sweep_dir}/data/raw/{split}", parallel=False)
