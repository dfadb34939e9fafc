"""CM-MoCo under two processes (gloo, CPU) equals one process on the same global batches:
keys and ids are gathered before they are queued, and same-id exclusion uses the global batch."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from tests.torchrun import free_port, join

WORLD = 2
CAPS = ["red coat", "blue jeans", "a black bag", "a hat", "grey shoes", "long hair", "a skirt", "a cap"]


def _run(rank: int, world: int, cache: str):
    """Two steps of the textreid objective on this rank's rows; returns step-2 loss, grads, queue."""
    os.environ["TBPS_CACHE"] = cache
    from tbps.recipes.config import load_recipe
    from tbps.models import create_model, get_tokenizer
    from tbps.objectives import StepContext, build_objective

    recipe = load_recipe("textreid-cpu", [
        "model.arch=micro-vit", "model.image_size=[32, 16]", "model.context_length=32", "model.embed_dim=16",
        "model.text_tower.source=random", "model.text_tower.hidden=8", "losses.cmmoco.queue_size=12",
        "losses.align.weight=1.0",
    ])
    torch.manual_seed(0)
    model = create_model(recipe.model)
    model.prepare_vocabulary(CAPS)
    tok = get_tokenizer(model.spec)
    objective = build_objective("textreid", model, recipe.losses, num_identities=12)
    g = torch.Generator().manual_seed(0)
    b = 8 // world
    out = None
    for step, pids in enumerate(([0, 0, 1, 2, 3, 3, 4, 5], [6, 6, 7, 8, 2, 9, 10, 11])):
        batch = {"image": torch.randn(8, 3, 32, 16, generator=g), "tokens": tok(CAPS), "pid": torch.tensor(pids)}
        local = {k: v[rank * b:(rank + 1) * b] for k, v in batch.items()}
        out = objective(model, local, StepContext(epoch=0.5, total_epochs=5, step=step))
    loss = sum(v for k, v in out.items() if k.endswith("_loss"))
    loss.backward()
    params = [p for p in list(model.parameters()) + list(objective.parameters()) if p.requires_grad]
    grads = torch.cat([p.grad.flatten() for p in params if p.grad is not None])
    q = objective.cmmoco
    return loss.detach(), grads, q.image_queue.feats.clone(), q.text_queue.ids.clone(), out["cmmoco_loss"].detach()


def _worker(rank: int, port: int, out_dir: str):
    from tbps.engine.distributed import leave_distributed

    torch.set_num_threads(1)
    info = join(rank, WORLD, port)
    loss, grads, feats, ids, moco = _run(rank, WORLD, out_dir)
    for t in (loss, grads, moco):  # what DDP does: average over ranks
        torch.distributed.all_reduce(t)
    torch.save({"loss": loss / WORLD, "grads": grads / WORLD, "moco": moco / WORLD, "feats": feats, "ids": ids},
               os.path.join(out_dir, f"rank{rank}.pt"))
    leave_distributed(info)


@pytest.mark.slow
def test_cmmoco_two_processes_equal_one(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    loss, grads, feats, ids, moco = _run(0, 1, str(tmp_path))
    # Every rank holds the same queue as one process would (keys gathered before enqueueing).
    assert torch.equal(r0["ids"], ids) and torch.equal(r1["ids"], ids)
    assert torch.allclose(r0["feats"], feats, atol=1e-5) and torch.allclose(r1["feats"], feats, atol=1e-5)
    assert ids.tolist() == [2, 9, 10, 11, 3, 3, 4, 5, 6, 6, 7, 8]  # 16 keys through 12 slots, FIFO
    # The id 2 of the second batch sits on rank 1 only: rank 0 must still drop queue entries of id 2.
    assert moco.item() > 0 and torch.allclose(r0["moco"], moco, rtol=1e-5, atol=1e-6)
    assert torch.allclose(r0["loss"], loss, rtol=1e-5, atol=1e-6)
    assert torch.allclose(r0["grads"], grads, rtol=1e-4, atol=1e-6), (r0["grads"] - grads).abs().max()
