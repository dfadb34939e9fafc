"""A stage's ``fresh_modules``: submodules whose weights start again when the run enters the stage.

The shared-base ablation's arms (docs/laip-irra.md) each began with a new fusion encoder, where a staged
run's later stage continues the one its base stage trained. ``fresh_modules: [objective.fusion]`` on a
stage re-initialises that submodule when the run enters the stage: every torch module under it that
holds parameters of its own is reset by its ``reset_parameters`` (torch's layers declare it; a module
that holds parameters without it is refused before training starts), the optimiser state of those
parameters is dropped (moments estimated for the old weights), and under torchrun rank 0's new values
are broadcast, so every rank trains the same weights. Paths are relative to the run's model and
objective, as ``bench/stage_cost.py --modules`` names them (``objective.fusion``,
``model.clip.visual.transformer``). A momentum copy of a reset module (``objective.momentum...``) is
not reset with it: name it too where it should be.
"""

from __future__ import annotations

from torch import nn

from tbps.engine.distributed import DistInfo, broadcast_parameters
from tbps.recipes.config import ConfigError


def check(root: nn.Module, stages: list[dict], *, weight_average: bool) -> None:
    """Refuse, before any training, a ``fresh_modules`` path that names no submodule of ``root`` (the
    run's model + objective), one under which a module cannot reset its parameters, and one under the
    model when the run keeps a weight average (its average would mix the old weights into the new)."""
    for i, st in enumerate(stages):
        for path in st.get("fresh_modules", []):
            where = f"stages[{i}].fresh_modules: {path}"
            try:
                module = root.get_submodule(path)
            except AttributeError:
                raise ConfigError(f"{where} is not a submodule of the run ({_nearest_children(root, path)})") from None
            for name, sub in module.named_modules(prefix=path):
                if _holds_parameters(sub) and not callable(getattr(type(sub), "reset_parameters", None)):
                    raise ConfigError(f"{where}: {name} ({type(sub).__name__}) holds parameters but has no "
                                      "reset_parameters to start them again")
            if weight_average and path.split(".")[0] == "model":
                raise ConfigError(f"{where}: not with train.ema (the weight average would keep the old weights)")


def _holds_parameters(module: nn.Module) -> bool:
    """Whether ``module`` holds parameters of its own (not only through its submodules)."""
    return next(module.parameters(recurse=False), None) is not None


def _nearest_children(root: nn.Module, path: str) -> str:
    """What the deepest part of ``path`` that exists holds, for the error message."""
    module, at = root, []
    for part in path.split("."):
        child = dict(module.named_children()).get(part)
        if child is None:
            break
        module, at = child, [*at, part]
    names = ", ".join(".".join([*at, name]) for name, _ in module.named_children()) or "no submodules"
    return f"{'.'.join(at) or 'the run'} holds {names}"


def reinitialise(root: nn.Module, paths: list[str], optimizer, info: DistInfo) -> int:
    """Reset the parameters of the submodules ``paths`` of ``root`` (checked by :func:`check`), drop
    their optimiser state and give every rank rank 0's values; returns the number of tensors reset."""
    params = []
    for path in paths:
        module = root.get_submodule(path)
        for sub in module.modules():
            if _holds_parameters(sub):
                sub.reset_parameters()
        params += list(module.parameters())
    for p in params:
        optimizer.state.pop(p, None)
    broadcast_parameters(params, info)
    return len(params)
