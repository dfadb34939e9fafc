"""The step's kernel options: ``optim.fused`` (torch's fused optimiser) and ``train.attention``
(the scaled-dot-product backend of the training steps). Same arithmetic, other kernels."""

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from tbps.engine.epoch import attention_kernel
from tbps.engine.optim import build_optimizer
from tbps.recipes.config import ConfigError, OptimConfig, load_recipe


def _steps(fused: bool, name: str = "adamw") -> tuple[torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 4)
    start = torch.cat([p.detach().flatten() for p in lin.parameters()])
    opt = build_optimizer({"model": lin}, OptimConfig(name=name, lr=1e-2, fused=fused))
    x = torch.randn(8, 6)
    for _ in range(3):
        opt.zero_grad()
        lin(x).pow(2).mean().backward()
        opt.step()
    return opt, start, torch.cat([p.detach().flatten() for p in lin.parameters()])


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_fused_optimiser_takes_the_same_steps(name):
    opt, start, fused = _steps(True, name)
    assert opt.defaults["fused"] is True
    _, _, plain = _steps(False, name)
    assert (fused - start).abs().min() > 1e-4  # every parameter moved
    assert torch.allclose(fused, plain, atol=1e-6), (fused - plain).abs().max()


def test_fused_is_refused_where_torch_has_none():
    lin = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="optim.fused: 'lamb'"):
        build_optimizer({"model": lin}, OptimConfig(name="lamb", fused=True))


def _attention_ops(choice: str) -> set[str]:
    q = torch.randn(2, 4, 8, 16, requires_grad=True)
    with profile() as prof:
        with attention_kernel(choice):
            out = F.scaled_dot_product_attention(q, q, q)
        out.sum().backward()
    return {e.name for e in prof.events() if "dot_product" in e.name}


def test_math_attention_leaves_the_flash_kernel_out_of_forward_and_backward():
    math_ops = _attention_ops("math")
    assert "aten::_scaled_dot_product_attention_math" in math_ops
    assert not any("flash" in op for op in math_ops), math_ops
    assert any("flash" in op for op in _attention_ops("auto"))  # what "auto" picks on a CPU torch


def test_attention_choice_is_checked_when_the_recipe_loads():
    assert load_recipe("tbps-clip-cpu", ["train.attention=math"]).train.attention == "math"
    with pytest.raises(ConfigError, match="train.attention is auto or math"):
        load_recipe("tbps-clip-cpu", ["train.attention=flash"])
