"""Two processes (gloo, CPU) with gathered features == one process on the same global batch."""

import os
import pathlib

import pytest
import torch
import torch.multiprocessing as mp

from tbps.engine.distributed import leave_distributed
from tbps.recipes.config import load_recipe
from tests.torchrun import free_port, join

WORLD = 2
OVERRIDES = ["model.arch=micro-vit", "model.pretrained=null", "model.image_size=[32, 16]",
             "model.context_length=32", "model.text_attn_dropout=0.0"]


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
    info = join(rank, WORLD, port)
    loss, grads = _loss_and_grads(rank, WORLD)
    # What DDP does: average gradients (and here the loss) over ranks.
    torch.distributed.all_reduce(grads)
    torch.distributed.all_reduce(loss)
    if rank == 0:
        torch.save({"loss": loss / WORLD, "grads": grads / WORLD}, os.path.join(out_dir, "dist.pt"))
    leave_distributed(info)


@pytest.mark.slow
def test_gathered_two_process_loss_and_gradients_equal_one_process(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
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


def _gloo_threads() -> list[str]:
    tasks = pathlib.Path("/proc/self/task")
    return [n for t in tasks.iterdir() if "gloo" in (n := (t / "comm").read_text().strip())]


def _leave_worker(rank: int, port: int, out_dir: str):
    info = join(rank, WORLD, port)
    during = _gloo_threads()
    import open_clip  # noqa: F401  (imports torch.distributed.nn, as every tbps model load does)

    from tbps.losses.gather import gather_with_grad

    x = torch.ones(2, 3, requires_grad=True)
    gather_with_grad(x).sum().backward()
    leave_distributed(info)
    pathlib.Path(out_dir, f"rank{rank}.txt").write_text(f"{len(during)} {len(_gloo_threads())}")


@pytest.mark.slow
@pytest.mark.skipif(not pathlib.Path("/proc/self/task").is_dir(), reason="reads thread names from Linux's /proc")
def test_leaving_ends_the_group_so_no_gloo_thread_outlives_it(tmp_path):
    """A group kept alive past the end (open_clip's import of torch.distributed.nn binds it) is torn
    down at interpreter exit in a race with the other rank, which aborts a process now and then."""
    mp.spawn(_leave_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        during, after = map(int, (tmp_path / f"rank{rank}.txt").read_text().split())
        assert during > 0 and after == 0, (rank, during, after)


def test_a_group_the_caller_made_is_left_to_the_caller(tmp_path, monkeypatch):
    from tbps.engine.distributed import init_distributed

    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        monkeypatch.setenv("WORLD_SIZE", "2")  # as if launched by torchrun, but the group already exists
        monkeypatch.setenv("RANK", "0")
        info = init_distributed("cpu")
        assert not info.owned
        leave_distributed(info)
        assert torch.distributed.is_initialized()
    finally:
        torch.distributed.destroy_process_group()
