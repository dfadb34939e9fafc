"""Two processes (gloo, CPU) with gathered features == one process on the same global batch."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from tbps.recipes.config import load_recipe

WORLD = 2
OVERRIDES = ["model.arch=micro-vit", "model.pretrained=null", "model.image_size=[32, 16]",
             "model.context_length=32", "model.text_attn_dropout=0.0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch():
    from tbps.models import get_tokenizer
    from tbps.models.factory import ModelSpec

    g = torch.Generator().manual_seed(0)
    x = lambda: torch.randn(8, 3, 32, 16, generator=g)  # noqa: E731
    tok = get_tokenizer(ModelSpec(arch="micro-vit", context_length=32))
    caps = ["red coat", "blue jeans", "a black bag", "a hat", "grey shoes", "long hair", "a skirt", "a cap"]
    return {"image": x(), "image_view2": x(), "ss_view1": x(), "ss_view2": x(), "tokens": tok(caps),
            "pid": torch.tensor([0, 0, 1, 2, 3, 3, 4, 5])}


def _loss_and_grads(rank: int, world: int):
    """Loss and flattened gradients on this rank's rows of the global batch (DDP-style mean)."""
    from tbps.models import create_model
    from tbps.objectives import StepContext, build_objective

    recipe = load_recipe("tbps-clip", OVERRIDES)
    torch.manual_seed(0)
    model = create_model(recipe.model)
    objective = build_objective("tbps-clip", model, recipe.losses, num_identities=6)
    batch = _global_batch()
    b = 8 // world
    local = {k: v[rank * b:(rank + 1) * b] for k, v in batch.items()}
    out = objective(model, local, StepContext(epoch=0.5, total_epochs=5, step=0))  # alpha ramped to 0.25
    loss = sum(v for k, v in out.items() if k.endswith("_loss"))
    loss.backward()
    params = [p for p in list(model.parameters()) + list(objective.parameters()) if p.requires_grad]
    grads = torch.cat([p.grad.flatten() for p in params])
    return loss.detach(), grads


def _worker(rank: int, port: int, out_dir: str):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    loss, grads = _loss_and_grads(rank, WORLD)
    # What DDP does: average gradients (and here the loss) over ranks.
    torch.distributed.all_reduce(grads)
    torch.distributed.all_reduce(loss)
    if rank == 0:
        torch.save({"loss": loss / WORLD, "grads": grads / WORLD}, os.path.join(out_dir, "dist.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_gathered_two_process_loss_and_gradients_equal_one_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    dist = torch.load(tmp_path / "dist.pt")
    loss, grads = _loss_and_grads(0, 1)
    assert torch.allclose(dist["loss"], loss, rtol=1e-5, atol=1e-6)
    assert torch.allclose(dist["grads"], grads, rtol=1e-4, atol=1e-6), (dist["grads"] - grads).abs().max()


def test_without_gathering_the_two_process_result_differs():
    """Guards the test above: a local-only contrast is not the global loss."""
    torch.manual_seed(0)
    full, _ = _loss_and_grads(0, 1)
    halves = [_loss_and_grads(r, 2)[0] for r in range(2)]  # no process group: keys are local only
    assert not torch.allclose(full, sum(halves) / 2, rtol=1e-3)
