"""Recipes: YAML files parsed into small dataclasses at one boundary.

A recipe names its objective (which losses), the model, the data pipeline, the
optimiser and the schedule. ``base: NAME`` inherits another recipe and overrides keys.
``key.sub=value`` overrides from the command line are applied on the merged dict.
Recipes shipped with tbps live in ``tbps/recipes/NAME.yaml``; any path works too.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tbps.data.text_aug import TextAugmentConfig
from tbps.data.transforms import AugmentConfig
from tbps.models.spec import ModelSpec

RECIPE_DIR = Path(__file__).parent
DEFAULT_RECIPE = "tbps-clip-cpu"


class ConfigError(ValueError):
    """A recipe or override is malformed; the message names the key."""

    user_error = True


@dataclass
class DataConfig:
    batch_size: int = 64  # per process
    identity_k: int = 0  # > 0: P x K identity-balanced batches with K images per identity
    num_workers: int = 2
    cache_images: bool = False  # decode the training images once into memory (small datasets, CPU)
    max_words: int = 77
    eval_batch_size: int = 256
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)
    text_augment: TextAugmentConfig | None = field(default_factory=TextAugmentConfig)


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | adam | sgd | lamb
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    weight_decay: float = 0.02
    momentum: float = 0.9  # sgd only
    lr_factors: dict[str, float] = field(default_factory=dict)  # parameter-name prefix -> lr multiplier
    schedule: str = "cosine"  # cosine | step | constant
    warmup_epochs: float = 1.0
    warmup_start_lr: float = 1e-6
    min_lr: float = 5e-6
    milestones: list[float] = field(default_factory=list)  # step schedule: epochs where lr *= gamma
    gamma: float = 0.1
    bias_lr_factor: float = 1.0  # != 1: biases take lr x this instead of their lr_factors one (IRRA: 2)
    schedule_unit: str = "step"  # step: the lr moves every step; epoch: held for each epoch (IRRA's scheduler)


@dataclass
class TrainConfig:
    epochs: int = 5
    seed: int = 0
    amp: bool = True  # used on GPU only
    grad_clip: float = 0.0
    logit_scale_init: float = 1 / 0.07
    logit_scale_max: float = 100.0
    # step: clamp the log-scale parameter at log(logit_scale_max) after every optimiser step; forward: leave
    # it free and cap exp(logit_scale) at logit_scale_max inside every forward, the gradient flowing as if
    # uncapped (TBPS-CLIP's code: the parameter may drift above the cap and must come back before the
    # value drops below it).
    logit_scale_clamp: str = "step"
    # AMP's low-precision type on CUDA: auto (bfloat16 where supported, else float16 with loss scaling),
    # float16 (the reference codes' torch.autocast default / IRRA's fp16 model) or bfloat16.
    amp_dtype: str = "auto"
    eval_every: int = 1  # epochs
    select_metric: str = "R1"  # val metric (text-to-image) that picks best.pt
    log_every: int = 10  # steps between metric rows in the progress bar
    budget_schedule: bool = True  # with --time-budget, run the lr schedule to its end by the deadline
    cpu_threads: int = 0  # torch threads on CPU; 0: the cores left over by the DataLoader workers


@dataclass
class Recipe:
    name: str
    objective: str = "tbps-clip"
    description: str = ""
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataConfig = field(default_factory=DataConfig)
    losses: dict[str, Any] = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stages: list[dict[str, Any]] = field(default_factory=list)  # optional: per-epoch-range overrides of `losses`

    def losses_at(self, epoch: int) -> dict[str, Any]:
        """The ``losses`` section in force at ``epoch``: the recipe's, overridden by each stage
        whose [start_epoch, end_epoch) holds the epoch."""
        losses = self.losses
        for stage in self.stages:
            if stage.get("start_epoch", 0) <= epoch < stage.get("end_epoch", math.inf):
                losses = _deep_merge(losses, stage.get("losses", {}))
        return losses

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        d["model"].pop("arch_config", None)
        return _plain(d)


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def _recipe_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    shipped = RECIPE_DIR / f"{name_or_path}.yaml"
    if shipped.exists():
        return shipped
    raise ConfigError(f"no recipe {name_or_path!r}: not a file, and not one of {list_recipes()}")


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_recipe_dict(name_or_path: str, _seen: tuple = ()) -> dict[str, Any]:
    """The merged dict of a recipe after following its ``base:`` chain."""
    path = _recipe_path(name_or_path)
    if path in _seen:
        raise ConfigError(f"recipe {path} inherits from itself")
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: a recipe is a YAML mapping")
    base = d.pop("base", None)
    if base:
        d = _deep_merge(load_recipe_dict(base, _seen + (path,)), d)
    d.setdefault("name", path.stem)
    if not _seen:
        d["name"] = path.stem
    return d


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings (value parsed as YAML) to a recipe dict."""
    d = copy.deepcopy(d)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. optim.lr=3e-4)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from e
        node = d
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = value
    return d


def coerce_like(default: Any, value: Any, where: str) -> Any:
    """Give ``value`` the type of ``default`` where YAML left it a string or an int
    (YAML reads ``3e-4`` as a string and ``1`` as an int)."""
    if isinstance(default, bool) or default is None or value is None:
        return value
    if isinstance(default, float) and isinstance(value, (str, int)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if isinstance(default, int) and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    return value


def _build(cls, d: Any, where: str):
    if d is None:
        return None
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping, got {d!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(fields)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(fields)}")
    kwargs = {}
    for k, v in d.items():
        if k in ("augment", "text_augment") and cls is DataConfig:
            kwargs[k] = _build(AugmentConfig if k == "augment" else TextAugmentConfig, v, f"{where}.{k}")
        elif isinstance(v, list) and k in ("betas", "pool"):
            kwargs[k] = tuple(coerce_like(0.0, x, f"{where}.{k}") if k == "betas" else x for x in v)
        else:
            default = fields[k].default
            kwargs[k] = coerce_like(default, v, f"{where}.{k}") if default is not dataclasses.MISSING else v
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e


def recipe_from_dict(d: dict[str, Any]) -> Recipe:
    """Validate a merged recipe dict into a :class:`Recipe` (unknown keys are errors)."""
    d = copy.deepcopy(d)
    known = {f.name for f in dataclasses.fields(Recipe)}
    unknown = set(d) - known
    if unknown:
        raise ConfigError(f"recipe {d.get('name')!r}: unknown section(s) {sorted(unknown)}; known: {sorted(known)}")
    try:
        model = ModelSpec.from_dict(d.get("model") or {})
    except ValueError as e:
        raise ConfigError(f"model: {e}") from e
    return Recipe(
        name=d.get("name", "recipe"),
        objective=d.get("objective", "tbps-clip"),
        description=d.get("description", ""),
        model=model,
        data=_build(DataConfig, d.get("data") or {}, "data"),
        losses=d.get("losses") or {},
        optim=_build(OptimConfig, d.get("optim") or {}, "optim"),
        train=_build(TrainConfig, d.get("train") or {}, "train"),
        stages=d.get("stages") or [],
    )


def load_recipe(name_or_path: str = DEFAULT_RECIPE, overrides: list[str] | None = None) -> Recipe:
    """Load a shipped recipe by name (or a YAML path), apply overrides, validate."""
    return recipe_from_dict(apply_overrides(load_recipe_dict(name_or_path), overrides or []))
