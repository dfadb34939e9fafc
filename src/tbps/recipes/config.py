"""Recipes: YAML files parsed into small dataclasses at one boundary.

A recipe names its objective (which losses), the model, the data pipeline, the
optimiser and the schedule. ``base: NAME`` inherits another recipe and overrides keys;
``base: [NAME, PART, ...]`` merges several, left to right, before the file's own keys.
``key.sub=value`` overrides from the command line are applied on the merged dict.
Recipes shipped with tbps live in ``tbps/recipes/NAME.yaml``; any path works too. A shipped
file named ``_PART.yaml`` is a part of other recipes (settings they share, named in their
``base:``), not a recipe: it is not listed and does not load on its own.
"""

from __future__ import annotations

import collections.abc
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
from tbps.recipes import stages as _st

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
    # adamw, adam, sgd: torch's fused implementation, one kernel per parameter group (on a CPU torch
    # otherwise loops over the parameters one by one). Same update, other rounding.
    fused: bool = False
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
    # At a stage boundary (recipes/stages.py) the schedule continues (one warm-up + decay over the whole
    # run) or restarts (warm-up + decay again within each stage segment, as a paper's second stage).
    stage_schedule: str = "continue"


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
    # Gradient caching: > 0 embeds each process's batch in chunks of this many pairs and reproduces the
    # loss and gradients of the whole batch (tbps.engine.gradcache); 0: off. For a global batch larger
    # than fits: data.batch_size = global batch / GPUs, grad_cache_chunk = what one GPU holds.
    grad_cache_chunk: int = 0
    # torch.compile the towers' transformers for training (TBPSModel.compile_towers): fused kernels, a few
    # seconds of compiling at the first step and at the first evaluation; on CPU it needs a C compiler. On
    # 2 CPU cores with tiny-vit it bought no steps (docs/performance-log.md, section 2, third sitting); not
    # yet timed on a GPU.
    compile: bool = False
    # The scaled-dot-product attention kernel of the training steps: auto (torch picks: flash attention
    # on CPU) or math (the plain matmul-softmax-matmul). Same attention, other rounding.
    attention: str = "auto"
    # A moving average of the weights (tbps.engine.ema): > 0 is its decay, and the average is what val
    # evaluates and best.pt keeps; 0: off. Probed on tiny-vit at 0.995 (docs/performance-log.md, section 2,
    # tenth sitting): test R@1 +0.1 +- 0.6 and mAP +0.1 to +0.3 against the online weights at the same step.
    ema: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"train.ema is 0 (off) or a decay in (0, 1), got {self.ema}")
        if self.grad_cache_chunk < 0:
            raise ValueError(f"grad_cache_chunk is 0 (off) or a chunk size in pairs, got {self.grad_cache_chunk}")
        if self.attention not in ("auto", "math"):
            raise ValueError(f"train.attention is auto or math, got {self.attention!r}")


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
    # optional: parts of the run with their own `losses` overrides, placed by fractions of the run or by
    # epochs (tbps.recipes.stages)
    stages: list[dict[str, Any]] = field(default_factory=list)

    def losses_at(self, position: float, total_epochs: float | None = None) -> dict[str, Any]:
        """The ``losses`` section in force at ``position`` (fractional epochs, on the schedule's clock:
        :mod:`tbps.recipes.stages`) of a run of ``total_epochs`` (default ``train.epochs``): the
        recipe's, overridden by each active stage in list order."""
        losses = self.losses
        for i in self.stage_at(position, total_epochs):
            losses = _deep_merge(losses, self.stages[i].get("losses", {}))
        return losses

    def stage_at(self, position: float, total_epochs: float | None = None) -> tuple[int, ...]:
        """Indices of the stages active at ``position``: the run switches losses when this changes."""
        return _st.active(self.stages, position, self.train.epochs if total_epochs is None else total_epochs)

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


def _is_part(path: Path) -> bool:
    """A shipped ``_PART.yaml``: settings other recipes name in their ``base:``, not a recipe."""
    return path.parent == RECIPE_DIR and path.stem.startswith("_")


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml") if not _is_part(p))


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
    if not _seen and _is_part(path):
        raise ConfigError(f"{path.stem} is a part of other recipes (named in their base:), not a recipe")
    base = d.pop("base", None)
    bases = base if isinstance(base, list) else [base] if base else []
    if not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"{path}: base is a recipe name or a list of them, got {base!r}")
    merged: dict[str, Any] = {}
    for b in bases:
        merged = _deep_merge(merged, load_recipe_dict(b, _seen + (path,)))
    d = _deep_merge(merged, d)
    d.setdefault("name", path.stem)
    if not _seen:
        d["name"] = path.stem
    return d


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings (value parsed as YAML) to a recipe dict. A malformed item
    raises :class:`ConfigError` naming it (never another exception: the parser is fuzzed)."""
    d = copy.deepcopy(d)
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. optim.lr=3e-4)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(p and not any(c.isspace() for c in p) for p in parts):
            raise ConfigError(f"override {item!r}: the key must be SECTION.KEY (e.g. optim.lr=3e-4)")
        if raw.strip() == "":
            raise ConfigError(f"override {item!r}: no value after '=' (write {'.'.join(parts)}=null to unset a key)")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {_first_line(e)}") from None
        except RecursionError:
            raise ConfigError(f"override {item!r}: value is nested too deeply") from None
        node = d
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = value
    return d


def _first_line(e: Exception) -> str:
    return " ".join(str(e).split())


def coerce_like(default: Any, value: Any, where: str) -> Any:
    """Give ``value`` the type of ``default`` where YAML left it a string or an int (YAML reads
    ``3e-4`` as a string and ``1`` as an int); a number that is not finite, or a fraction where an
    integer belongs, is a :class:`ConfigError` naming ``where``."""
    if isinstance(default, bool) or default is None or value is None:
        return value
    if isinstance(default, float) and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        try:
            x = float(value)
        except (ValueError, OverflowError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if not math.isfinite(x):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return x
    if isinstance(default, int) and isinstance(value, (str, float)):
        try:
            x = int(value) if isinstance(value, str) else value
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if isinstance(x, float) and not (math.isfinite(x) and x.is_integer()):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(x)
    return value


def _bounds(low: float | None = None, high: float | None = None, *, open_low: bool = False,
            open_high: bool = False):
    """A range check of a number and the words that say it (``> 0``, ``in [0, 1]``)."""

    def ok(x: float) -> bool:
        return ((low is None or (x > low if open_low else x >= low))
                and (high is None or (x < high if open_high else x <= high)))

    if high is None:
        words = f"{'>' if open_low else '>='} {low:g}"
    elif low is None:
        words = f"{'<' if open_high else '<='} {high:g}"
    else:
        words = f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
    return ok, words


_POSITIVE, _NON_NEGATIVE, _FRACTION = _bounds(0, open_low=True), _bounds(0), _bounds(0, 1)
# The allowed range of each number of a recipe, by dotted key (lists and dicts: each element).
RANGES = {
    "data.batch_size": _POSITIVE, "data.identity_k": _NON_NEGATIVE, "data.num_workers": _NON_NEGATIVE,
    "data.max_words": _POSITIVE, "data.eval_batch_size": _POSITIVE, "data.augment.num_ops": _NON_NEGATIVE,
    "data.augment.hflip": _FRACTION,
    "data.text_augment.backtranslation_prob": _FRACTION, "data.text_augment.deletion_prob": _FRACTION,
    "optim.lr": _NON_NEGATIVE, "optim.betas": _bounds(0, 1, open_high=True), "optim.eps": _POSITIVE,
    "optim.weight_decay": _NON_NEGATIVE, "optim.momentum": _FRACTION, "optim.lr_factors": _NON_NEGATIVE,
    "optim.warmup_epochs": _NON_NEGATIVE, "optim.warmup_start_lr": _NON_NEGATIVE, "optim.min_lr": _NON_NEGATIVE,
    "optim.milestones": _NON_NEGATIVE, "optim.gamma": _POSITIVE,
    "train.epochs": _POSITIVE, "train.grad_clip": _NON_NEGATIVE, "train.logit_scale_init": _POSITIVE,
    "train.logit_scale_max": _POSITIVE, "train.eval_every": _POSITIVE, "train.log_every": _POSITIVE,
    "train.cpu_threads": _NON_NEGATIVE, "train.seed": _NON_NEGATIVE,
    "model.context_length": _POSITIVE, "model.image_size": _POSITIVE, "model.embed_dim": _POSITIVE,
    "model.text_attn_dropout": _bounds(0, 1, open_high=True), "model.std": _POSITIVE,
}
CHOICES = {
    "optim.name": ("adamw", "adam", "sgd", "lamb"),
    "optim.schedule": ("cosine", "step", "constant"),
    "optim.stage_schedule": ("continue", "restart"),
    "train.select_metric": ("R1", "R5", "R10", "mAP", "mINP"),
}


def _typed(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against a field's type hint (int, float, bool, str, ``X | None``, tuples,
    lists and dicts of those), floats made finite floats; else a :class:`ConfigError` naming ``where``."""
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _typed(value, inner[0], where) if len(inner) == 1 else value
    if value is None:
        raise ConfigError(f"{where}: a value is required, got null")
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        value = coerce_like(0, value, where)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        value = coerce_like(0.0, value, where)
        if not isinstance(value, float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if origin in (tuple, list, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis and len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
        items = [_typed(v, args[min(i, len(args) - 1)] if args else Any, where) for i, v in enumerate(value)]
        return tuple(items) if origin is not list else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {_typed(k, args[0], where): _typed(v, args[1], where) for k, v in value.items()}
    return value


def _in_range(value: Any, where: str) -> None:
    """The :data:`RANGES` and :data:`CHOICES` check of one (already typed) value."""
    if where in CHOICES and value not in CHOICES[where]:
        raise ConfigError(f"{where}: expected one of {list(CHOICES[where])}, got {value!r}")
    rule = RANGES.get(where)
    if rule is None or value is None:
        return
    ok, words = rule
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
    for x in items:
        if not ok(x):
            raise ConfigError(f"{where}: must be {words}, got {value!r}")


def _build(cls, d: Any, where: str):
    if d is None:
        return None
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping, got {d!r}")
    import typing

    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = set(d) - set(fields)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(map(str, unknown))}; known: {sorted(fields)}")
    kwargs = {}
    for k, v in d.items():
        if k in ("augment", "text_augment") and cls is DataConfig:
            kwargs[k] = _build(AugmentConfig if k == "augment" else TextAugmentConfig, v, f"{where}.{k}")
        else:
            kwargs[k] = _checked_value(v, hints[k], f"{where}.{k}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e


def _checked_value(value: Any, hint: Any, where: str) -> Any:
    """One recipe value given its field's type and checked against the key's range."""
    value = _typed(value, hint, where)
    _in_range(value, where)
    return value


def _model_spec(d: Any) -> ModelSpec:
    """The recipe's ``model:`` section as a checked :class:`ModelSpec`."""
    import typing

    if not isinstance(d, dict):
        raise ConfigError(f"model: expected a mapping, got {d!r}")
    hints = typing.get_type_hints(ModelSpec)
    unknown = set(d) - set(hints)
    if unknown:
        raise ConfigError(f"model: unknown model option(s) {sorted(map(str, unknown))}; known: {sorted(hints)}")
    checked = {k: _checked_value(v, hints[k], f"model.{k}") for k, v in d.items()}
    if not checked.get("arch", "tiny-vit").strip():
        raise ConfigError("model.arch: an architecture name is required")
    try:
        return ModelSpec.from_dict(checked)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from e


def _stages(stages: Any) -> list[dict[str, Any]]:
    """``stages:``: a list of ``{start, end, losses, lr_scale, fresh_optimizer, fresh_modules}`` (fractions of the
    run) or ``{start_epoch, end_epoch, ...}`` (epochs) mappings; one way for all stages."""
    if not isinstance(stages, list):
        raise ConfigError(f"stages: expected a list, got {stages!r}")
    for i, st in enumerate(stages):
        where = f"stages[{i}]"
        if not isinstance(st, dict) or set(st) - set(_st.STAGE_KEYS):
            raise ConfigError(f"{where}: expected a mapping of start and end (fractions of the run) or start_epoch "
                              f"and end_epoch, losses, lr_scale, fresh_optimizer and fresh_modules, got {st!r}")
        for k in (*_st.FRACTION_KEYS, *_st.EPOCH_KEYS, "lr_scale"):
            if k in st:
                st[k] = _typed(st[k], float, f"{where}.{k}")
        for k in _st.FRACTION_KEYS:
            if k in st and not 0.0 <= st[k] <= 1.0:
                raise ConfigError(f"{where}.{k}: a fraction of the run, in [0, 1], got {st[k]!r}")
        for k in _st.EPOCH_KEYS:
            if k in st and st[k] < 0:
                raise ConfigError(f"{where}.{k}: must be >= 0, got {st[k]!r}")
        if "lr_scale" in st and st["lr_scale"] <= 0:
            raise ConfigError(f"{where}.lr_scale: must be > 0, got {st['lr_scale']!r}")
        if not isinstance(st.get("fresh_optimizer", False), bool):
            raise ConfigError(f"{where}.fresh_optimizer: true or false, got {st['fresh_optimizer']!r}")
        mods = st.get("fresh_modules", [])
        if not isinstance(mods, list) or not all(isinstance(m, str) and m for m in mods):
            raise ConfigError(f"{where}.fresh_modules: a list of submodule paths (e.g. [objective.fusion]), "
                              f"got {mods!r}")
        frac = any(k in st for k in _st.FRACTION_KEYS)
        if frac and any(k in st for k in _st.EPOCH_KEYS):
            raise ConfigError(f"{where}: give start/end (fractions of the run) or start_epoch/end_epoch, not both")
        keys = _st.FRACTION_KEYS if frac else _st.EPOCH_KEYS
        lo, hi = st.get(keys[0], 0.0), st.get(keys[1], 1.0 if frac else math.inf)
        if hi <= lo:
            key = keys[1] if keys[1] in st else keys[0]
            raise ConfigError(f"{where}.{key}: a stage must end after it starts, got {keys[0]} {lo:g}, "
                              f"{keys[1]} {hi:g}")
        if not isinstance(st.get("losses", {}), dict):
            raise ConfigError(f"{where}.losses: expected a mapping, got {st['losses']!r}")
    if _st.by_fraction(stages):
        mixed = next((i for i, st in enumerate(stages) if any(k in st for k in _st.EPOCH_KEYS)), None)
        if mixed is not None:
            raise ConfigError(f"stages[{mixed}]: place every stage by fractions of the run (start, end) or every "
                              "stage by epochs (start_epoch, end_epoch), not both")
    return stages


def recipe_from_dict(d: dict[str, Any]) -> Recipe:
    """Validate a merged recipe dict into a :class:`Recipe`: unknown keys, wrong types, numbers out
    of range (:data:`RANGES`) and NaN are :class:`ConfigError` naming the key."""
    if not isinstance(d, dict):
        raise ConfigError(f"a recipe is a mapping, got {d!r}")
    d = copy.deepcopy(d)
    known = {f.name for f in dataclasses.fields(Recipe)}
    unknown = set(d) - known
    if unknown:
        raise ConfigError(f"recipe {d.get('name')!r}: unknown section(s) {sorted(map(str, unknown))}; "
                          f"known: {sorted(known)}")
    for k in ("name", "objective", "description"):
        if k in d and d[k] is not None and not isinstance(d[k], str):
            raise ConfigError(f"{k}: expected a string, got {d[k]!r}")
    losses = d.get("losses") or {}
    if not isinstance(losses, dict):
        raise ConfigError(f"losses: expected a mapping, got {losses!r}")
    return Recipe(
        name=d.get("name") or "recipe",
        objective=d.get("objective") or "tbps-clip",
        description=d.get("description") or "",
        model=_model_spec(d.get("model") or {}),
        data=_build(DataConfig, d.get("data") or {}, "data"),
        losses=losses,
        optim=_build(OptimConfig, d.get("optim") or {}, "optim"),
        train=_build(TrainConfig, d.get("train") or {}, "train"),
        stages=_stages(d.get("stages") or []),
    )


def load_recipe(name_or_path: str = DEFAULT_RECIPE, overrides: list[str] | None = None) -> Recipe:
    """Load a shipped recipe by name (or a YAML path), apply overrides, validate."""
    return recipe_from_dict(apply_overrides(load_recipe_dict(name_or_path), overrides or []))
