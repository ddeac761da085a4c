"""A sweep's declaration (``docs/sweeps.md``): a base ``train`` config (``dino train``'s YAML), a
``search_space`` of dotted TrainConfig fields -> one distribution each, the ASHA/PBT ``scheduler``,
the ``budget`` and the ``register`` gate. Errors name the field
(``search_space.optim.lr: loguniform needs 0 < low < high``).
"""
from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Union

from dino_platform.errors import ConfigError
from dino_platform.train.config import TrainConfig, load_config
from dino_platform.typed_config import number, parse_section
from dino_platform.yaml_docs import check_keys, load_document, set_dotted

DOMAIN_KINDS = ("loguniform", "uniform", "choice", "randint")
# fields the sweep sets itself for every trial
RESERVED = ("run.name", "run.storage_path", "tracking.tracking_uri", "tracking.experiment", "tracking.enabled")
# what PBT may change while a trial continues another's checkpoint: optimizer settings and the
# model options that change neither the weights' shapes nor the optimizer's partitioning
PBT_MUTABLE_OPTIM = ("lr", "lr_backbone", "weight_decay", "clip_max_norm", "lr_drop_factor")
PBT_MUTABLE_MODEL = ("dn_number", "dn_label_noise_ratio", "dn_box_noise_scale", "set_cost_class", "set_cost_bbox",
                     "set_cost_giou", "cls_loss_coef", "bbox_loss_coef", "giou_loss_coef", "interm_loss_coef",
                     "focal_alpha")


@dataclass(frozen=True)
class Domain:
    """One search dimension: ``loguniform``/``uniform`` [low, high], ``randint`` [low, high] (inclusive), ``choice``."""

    kind: str
    values: tuple

    def to_tune(self):
        from ray import tune

        if self.kind == "randint":
            return tune.randint(self.values[0], self.values[1] + 1)  # Tune's upper bound is exclusive
        if self.kind == "choice":
            return tune.choice(list(self.values))
        return getattr(tune, self.kind)(*self.values)  # loguniform, uniform

    def extremes(self) -> List[Any]:
        """Values that together exercise the field's type and range checks."""
        if self.kind == "choice":
            return list(self.values)
        if self.kind == "randint":
            return list(self.values)
        return [float(v) for v in self.values]  # Tune samples floats: an integer field rejects them


@dataclass
class SchedulerSpec:
    kind: Literal["asha", "pbt", "fifo"] = "asha"
    metric: str = "eval/AP"
    mode: Literal["max", "min"] = "max"
    # counted in epochs (the ``epoch`` every training report carries); max_t defaults to optim.epochs
    grace_period: int = 1  # ASHA: first rung; PBT: no perturbation before this epoch (burn-in)
    reduction_factor: int = 2  # ASHA
    max_t: Optional[int] = None  # ASHA
    # PBT
    perturbation_interval: int = 1
    quantile_fraction: float = 0.25
    resample_probability: float = 0.25
    mutate: Optional[List[str]] = None  # search_space keys PBT perturbs; None: every mutable one
    # synch: trials that reach a perturbation point pause until every live trial is there, then the whole
    # population is ranked at once (slower: paused trials restart; with few trials and epochs, async PBT
    # often ranks a trial alone, and a top trial that was never ranked has no checkpoint to clone)
    synch: bool = False


@dataclass
class BudgetSpec:
    num_samples: int = 8
    max_concurrent: int = 2
    # the trial's own process (it only drives a TorchTrainer); workers ask for train.scaling's resources
    trial_cpus: float = 0.1
    seed: int = 0


@dataclass
class RegisterSpec:
    enabled: bool = True
    model_name: str = "dino-coco"
    alias: str = "champion"
    # shards the best checkpoint is evaluated on; None: the training config's data.eval_uri
    eval_data: Optional[str] = None
    eval_workers: int = 1
    eval_cpus_per_worker: float = 0.5


@dataclass
class SweepSpec:
    name: str
    output_root: str
    train: Dict[str, Any]
    search_space: Dict[str, Domain]
    tracking_uri: Optional[str] = None
    experiment: str = "sweep"
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    budget: BudgetSpec = field(default_factory=BudgetSpec)
    register: RegisterSpec = field(default_factory=RegisterSpec)
    # smoke runs: {train: {images, seed, size}, val: {...}}: synthetic COCO-like images (dino synth),
    # ingested into train.data.train_uri / eval_uri when those hold no shards yet
    synth: Optional[Dict[str, Any]] = None
    ray: Dict[str, Any] = field(default_factory=dict)
    source: str = "spec"

    @property
    def sweep_dir(self) -> str:
        return f"{self.output_root.rstrip('/')}/{self.name}"

    def base_config(self) -> TrainConfig:
        return load_config(self.train)

    @property
    def max_epochs(self) -> int:
        return self.scheduler.max_t or self.base_config().optim.epochs

    def pbt_mutations(self) -> Dict[str, Any]:
        """PBT's ``hyperparam_mutations``: each mutated key's distribution (a list for ``choice``)."""
        keys = self.scheduler.mutate if self.scheduler.mutate is not None else filter(pbt_mutable, self.search_space)
        space = self.search_space
        return {k: list(space[k].values) if space[k].kind == "choice" else space[k].to_tune() for k in keys}


_TOP = ("name", "description", "output_root", "tracking", "train", "search_space", "scheduler", "budget",
        "register", "synth", "ray", "presets")


def load_sweep_spec(source: Union[str, Path, Dict[str, Any]], preset: Optional[str] = None,
                    overrides: Optional[List[str]] = None) -> SweepSpec:
    """Read the YAML, apply a preset (deep merge; a preset's ``search_space`` replaces the whole
    space) and ``a.b=value`` overrides, validate everything."""
    return load_document(source, "sweep spec", "name, output_root, train, search_space", preset, overrides,
                         "budget.num_samples=8", _build, replace=("search_space",))


def _build(raw: Dict[str, Any], origin: str) -> SweepSpec:
    check_keys(raw, _TOP)
    for key in ("name", "output_root", "train", "search_space"):
        if not raw.get(key):
            raise ConfigError(f"{key}: required")
    for key in ("name", "output_root"):
        if not isinstance(raw[key], str):
            raise ConfigError(f"{key}: expected a non-empty string, got {raw[key]!r}")
    if not isinstance(raw["train"], dict):
        raise ConfigError("train: expected a mapping (a dino train config)")
    tracking = raw.get("tracking") or {}
    if set(tracking) - {"uri", "experiment"}:
        raise ConfigError(f"tracking.{sorted(set(tracking) - {'uri', 'experiment'})[0]}: unknown; allowed: uri, experiment")
    spec = SweepSpec(
        name=raw["name"], output_root=raw["output_root"],
        train=copy.deepcopy(raw["train"]), search_space=parse_search_space(raw["search_space"]),
        tracking_uri=tracking.get("uri"), experiment=tracking.get("experiment") or raw["name"],
        scheduler=parse_section(SchedulerSpec, raw.get("scheduler") or {}, "scheduler"),
        budget=parse_section(BudgetSpec, raw.get("budget") or {}, "budget"),
        register=parse_section(RegisterSpec, raw.get("register") or {}, "register"),
        synth=raw.get("synth"), ray=dict(raw.get("ray") or {}), source=origin,
    )
    _validate(spec)
    return spec


def parse_search_space(raw: Any) -> Dict[str, Domain]:
    """``{"optim.lr": {"loguniform": [1e-5, 1e-3]}}`` -> ``{"optim.lr": Domain(...)}``; errors name the field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"search_space: expected a mapping of dotted training fields to distributions, got {raw!r}")
    space: Dict[str, Domain] = {}
    for key, body in raw.items():
        name = f"search_space.{key}"
        _check_field_path(str(key), name)
        if not isinstance(body, dict) or len(body) != 1 or next(iter(body)) not in DOMAIN_KINDS:
            raise ConfigError(f"{name}: expected one of {{{': [...]}, {'.join(DOMAIN_KINDS)}: [...]}}, got {body!r}")
        kind, values = next(iter(body.items()))
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{name}: {kind} needs a non-empty list, got {values!r}")
        if kind != "choice":
            values = [number(v, name) for v in values]
            if len(values) != 2:
                raise ConfigError(f"{name}: {kind} needs [low, high], got {values!r}")
            low, high = values
            if kind == "randint" and not all(isinstance(v, int) for v in values):
                raise ConfigError(f"{name}: randint needs integer bounds, got {values!r}")
            if kind == "loguniform" and low <= 0:
                raise ConfigError(f"{name}: loguniform needs 0 < low < high, got {values!r}")
            if not low < high:
                raise ConfigError(f"{name}: {kind} needs low < high, got {values!r}")
        space[str(key)] = Domain(kind, tuple(values))
    if not space:
        raise ConfigError("search_space: at least one field to search is required")
    return space


def _check_field_path(key: str, name: str) -> None:
    """``key`` must be a leaf of TrainConfig, or ``model.overrides.<DinoConfig field>``."""
    if key in RESERVED:
        raise ConfigError(f"{name}: set by the sweep for every trial; it cannot be searched")
    parts = key.split(".")
    if parts[:2] == ["model", "overrides"] and len(parts) == 3:
        from dino_core.presets import DinoConfig

        allowed = [f.name for f in dataclasses.fields(DinoConfig)]
        if parts[2] not in allowed:
            raise ConfigError(f"{name}: {parts[2]!r} is not a dino_core model option; allowed: {', '.join(allowed)}")
        return
    cls: Any = TrainConfig
    for depth, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"{name}: {'.'.join(parts[:depth])} is not a section")
        fields = [f.name for f in dataclasses.fields(cls)]
        if part not in fields:
            where = ".".join(parts[:depth]) or "the training config"
            raise ConfigError(f"{name}: no field {part!r} in {where}; allowed: {', '.join(fields)}")
        cls = typing.get_type_hints(cls)[part]
    if dataclasses.is_dataclass(cls):
        raise ConfigError(f"{name}: a section, not a field; search one of its fields, e.g. {key}.{dataclasses.fields(cls)[0].name}")


def pbt_mutable(key: str) -> bool:
    section, _, leaf = key.rpartition(".")
    return (section == "optim" and leaf in PBT_MUTABLE_OPTIM) or (
        section == "model.overrides" and leaf in PBT_MUTABLE_MODEL)


def apply_values(train: Dict[str, Any], values: Dict[str, Any]) -> Dict[str, Any]:
    """A copy of the raw training config with each dotted field set to its sampled value."""
    raw = copy.deepcopy(train)
    for key, value in values.items():
        set_dotted(raw, key, value, f"search_space.{key}")
    return raw


def _inner(exc: Exception) -> str:
    return str(exc).removeprefix("config: ")  # load_config's origin for a dict; the sweep names its own


def _validate(spec: SweepSpec) -> None:
    b, s = spec.budget, spec.scheduler
    for name, value in (("budget.num_samples", b.num_samples), ("budget.max_concurrent", b.max_concurrent),
                        ("scheduler.grace_period", s.grace_period)):
        if value < 1:
            raise ConfigError(f"{name}: {value} must be >= 1")
    if b.trial_cpus <= 0:
        raise ConfigError(f"budget.trial_cpus: {b.trial_cpus} must be > 0 (Tune needs a resource per trial; e.g. 0.05)")
    if s.reduction_factor < 2:
        raise ConfigError(f"scheduler.reduction_factor: {s.reduction_factor} must be >= 2")
    for key in RESERVED:
        section, leaf = key.split(".")
        if leaf in (spec.train.get(section) or {}) and key != "run.storage_path":
            raise ConfigError(f"train.{key}: set by the sweep for every trial; remove it")
    try:
        base = spec.base_config()
    except ConfigError as exc:
        raise ConfigError(f"train: {_inner(exc)}") from None
    # every searched value must give a valid training config (types, ranges, model options)
    for key, domain in spec.search_space.items():
        for value in domain.extremes():
            try:
                cfg = load_config(apply_values(spec.train, {key: value}))
                if key.startswith("model.overrides."):
                    from dino_core.presets import get_config

                    get_config(cfg.model.preset, **cfg.model.overrides)
            except (ConfigError, ValueError, TypeError) as exc:
                raise ConfigError(f"search_space.{key}: value {value!r} gives an invalid training config ({_inner(exc)})") from None
    if s.metric.startswith("eval/") and not (base.data.eval_uri or spec.synth):
        raise ConfigError(f"scheduler.metric: {s.metric} needs evaluation during training; set train.data.eval_uri")
    if s.max_t is not None and s.max_t < s.grace_period:
        raise ConfigError(f"scheduler.max_t: {s.max_t} must be >= grace_period {s.grace_period}")
    if s.kind == "pbt":
        _validate_pbt(spec)


def _validate_pbt(spec: SweepSpec) -> None:
    s = spec.scheduler
    if s.perturbation_interval < 1:
        raise ConfigError(f"scheduler.perturbation_interval: {s.perturbation_interval} must be >= 1 (epochs)")
    if not 0 < s.quantile_fraction <= 0.5:
        raise ConfigError(f"scheduler.quantile_fraction: {s.quantile_fraction} must be in (0, 0.5]")
    if not 0 <= s.resample_probability <= 1:
        raise ConfigError(f"scheduler.resample_probability: {s.resample_probability} must be in [0, 1]")
    for key in s.mutate if s.mutate is not None else []:
        if key not in spec.search_space:
            raise ConfigError(f"scheduler.mutate: {key} is not in search_space; PBT perturbs searched fields only")
        if not pbt_mutable(key):
            raise ConfigError(
                f"scheduler.mutate: {key} cannot change while a trial continues another's checkpoint (it changes "
                f"the weights' shapes, the data or the workers); PBT can mutate optim.{{{', '.join(PBT_MUTABLE_OPTIM)}}} "
                f"and model.overrides.{{{', '.join(PBT_MUTABLE_MODEL)}}}")
    if not spec.pbt_mutations():
        raise ConfigError("scheduler.mutate: PBT needs at least one mutable field in search_space (e.g. optim.lr)")
    if spec.budget.max_concurrent < 2:
        raise ConfigError(f"budget.max_concurrent: {spec.budget.max_concurrent}; PBT needs a population of at "
                          f"least 2 trials running together")
