"""Gradient caching (train.grad_cache_chunk): chunked steps give the whole batch's loss and gradients.

Each cacheable objective (TBPS-CLIP: N-ITC + R-ITC + C-ITC + MVS + SS; IRRA: SDM + ID + MLM;
TextReID: CM-MoCo + ID + alignment) on a micro model with dropout inside both encoders:

* with dropout on, the cached step equals one graph through the whole batch that draws the same
  dropout masks (the chunks embedded with a graph, concatenated, one backward), in the loss and in
  every parameter's gradient to 1e-5: the replay of each chunk's random state is what makes
  them agree (without it they differ, the planted defect);
* with dropout off, the cached step equals the objective's plain forward on the whole batch;
* objectives that cannot be cached refuse the key in one line, before any data is read.
"""

from __future__ import annotations

import copy
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tbps.engine import gradcache
from tbps.engine.distributed import leave_distributed
from tbps.objectives import StepContext, build_objective
from tbps.recipes.config import ConfigError, load_recipe
from tbps.threads import torch_threads
from tests.torchrun import free_port, join

MICRO = ["model.arch=micro-vit", "model.pretrained=null", "model.image_size=[32, 16]", "model.context_length=32",
         "model.text_attn_dropout=0.0"]
CAPTIONS = ["red coat", "blue jeans", "a black bag", "a hat", "grey shoes", "long hair", "a skirt", "a cap"]
PIDS = [0, 0, 1, 2, 3, 3, 4, 5]
CTX = StepContext(epoch=0.5, total_epochs=5, step=0)  # N-ITC's soft labels half ramped in
SETUPS = {
    # the paper recipe's terms (MVS and SS included) with C-ITC switched on
    "tbps-clip": ("tbps-clip", ["losses.citc.weight=0.1"]),
    "irra": ("irra-cpu", ["losses.fusion.width=32", "losses.fusion.heads=2"]),  # SDM + ID + MLM
    "textreid": ("textreid-cpu", ["model.embed_dim=24", "model.text_tower.source=random", "model.text_tower.hidden=16",
                                  "losses.cmmoco.queue_size=16", "losses.align.weight=1.0"]),
}


@pytest.fixture(autouse=True)
def _one_thread(tmp_path, monkeypatch):
    monkeypatch.setenv("TBPS_CACHE", str(tmp_path / "cache"))  # TextReID's word dictionary
    with torch_threads(1):
        yield


def _setup(name: str, dropout: float, n: int = 8):
    """Model, objective and a batch of ``n`` pairs; ``dropout`` on both encoders' outputs."""
    from tbps.models import create_model, get_tokenizer

    recipe_name, over = SETUPS[name]
    recipe = load_recipe(recipe_name, MICRO + over)
    torch.manual_seed(0)
    model = create_model(recipe.model)
    model.prepare_vocabulary(CAPTIONS)
    objective = build_objective(recipe.objective, model, recipe.losses, num_identities=6)
    g = torch.Generator().manual_seed(0)
    x = lambda: torch.randn(n, 3, 32, 16, generator=g)  # noqa: E731
    caps = (CAPTIONS * 2)[:n]
    tok = get_tokenizer(model.spec)
    batch = {"image": x(), "image_view2": x(), "ss_view1": x(), "ss_view2": x(), "tokens": tok(caps),
             "pid": torch.tensor((PIDS * 2)[:n]), "captions": caps}
    hook = objective.batch_hook(None)
    if hook is not None:  # IRRA's masked captions
        batch = hook(batch, tok)
    if getattr(objective, "cmmoco", None) is not None:  # a full queue of other people's keys
        keys = lambda: F.normalize(torch.randn(16, 24, generator=g), dim=-1)  # noqa: E731
        objective.cmmoco.image_queue.enqueue(keys(), torch.arange(100, 116))
        objective.cmmoco.text_queue.enqueue(keys(), torch.arange(100, 116))
    if dropout > 0:
        text = model.text_stream if model.text_stream is not None else model.clip.transformer
        for module in (model.clip.visual.transformer, text):
            module.register_forward_hook(lambda m, i, o: F.dropout(o, dropout, training=True))
    model.train()
    objective.train()
    return model, objective, batch


def _grads(model, objective) -> dict[str, torch.Tensor]:
    named = [*(("model." + k, p) for k, p in model.named_parameters()),
             *(("objective." + k, p) for k, p in objective.named_parameters())]
    return {k: p.grad.clone() for k, p in named if p.grad is not None}


def _one_graph(objective, model, batch, chunk: int) -> torch.Tensor:
    """The reference: the chunks embedded with a graph (the same random draws as the cached path's
    first pass), concatenated, the losses over the whole batch, one backward."""
    from tbps.engine.gradcache import _cat, _take

    n = batch["pid"].shape[0]
    parts = [objective.embed(model, _take(batch, slice(i, min(i + chunk, n)), n)) for i in range(0, n, chunk)]
    features = {k: _cat([p[k] for p in parts]) for k in parts[0]}
    out = objective.loss_from_features(model, features, batch, CTX)
    loss = sum(v for k, v in out.items() if k.endswith("_loss"))
    loss.backward()
    return loss.detach()


def _max_diff(a: dict, b: dict) -> float:
    """The largest difference of two sets of gradients, per tensor relative to the size of its largest
    entry when that is above 1 (IRRA's MLM head gives gradients near 10: float32 rounding of a
    different summation order is then ~1e-5 of them), absolute otherwise."""
    assert a.keys() == b.keys(), set(a) ^ set(b)
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1.0)).item() for k in a)


@pytest.mark.parametrize("name", list(SETUPS))
def test_cached_step_equals_one_graph_over_the_batch_with_dropout(name):
    model, objective, batch = _setup(name, dropout=0.2)
    ref_model, ref_objective = copy.deepcopy(model), copy.deepcopy(objective)
    torch.manual_seed(1)
    _, loss = gradcache.forward_backward(objective, model, batch, CTX, 3)  # chunks of 3, 3, 2
    torch.manual_seed(1)
    ref_loss = _one_graph(ref_objective, ref_model, batch, 3)
    got, want = _grads(model, objective), _grads(ref_model, ref_objective)
    assert len(got) > 5 and sum(g.abs().sum().item() for g in got.values()) > 0
    assert abs(loss.item() - ref_loss.item()) <= 1e-5
    assert _max_diff(got, want) <= 1e-5, _max_diff(got, want)
    # Objective state moved the same way (CM-MoCo: EMA key encoder and queues).
    sa, sb = objective.state_dict(), ref_objective.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if torch.is_tensor(sa[k]))


def test_without_replaying_the_random_state_the_gradients_differ():
    """Guards the test above: dropout masks of the replay that differ from the first pass are
    visible in the gradients."""
    model, objective, batch = _setup("tbps-clip", dropout=0.2)
    ref_model, ref_objective = copy.deepcopy(model), copy.deepcopy(objective)
    torch.manual_seed(1)
    gradcache.forward_backward(objective, model, batch, CTX, 3, replay_rng=False)
    torch.manual_seed(1)
    _one_graph(ref_objective, ref_model, batch, 3)
    assert _max_diff(_grads(model, objective), _grads(ref_model, ref_objective)) > 1e-3


@pytest.mark.parametrize("name", list(SETUPS))
@pytest.mark.parametrize("chunk", [3, 8])
def test_cached_step_equals_the_plain_forward_without_dropout(name, chunk):
    model, objective, batch = _setup(name, dropout=0.0)
    ref_model, ref_objective = copy.deepcopy(model), copy.deepcopy(objective)
    _, loss = gradcache.forward_backward(objective, model, batch, CTX, chunk)
    out = ref_objective(ref_model, batch, CTX)
    ref_loss = sum(v for k, v in out.items() if k.endswith("_loss"))
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= 1e-5
    assert _max_diff(_grads(model, objective), _grads(ref_model, ref_objective)) <= 1e-5


def test_an_undeclared_encoder_call_is_an_error():
    from tbps.objectives.cached import GradCacheError

    model, objective, batch = _setup("tbps-clip", dropout=0.0)
    objective.embeddings = lambda: [e for e in type(objective).embeddings(objective) if e.key != "ss_view2"]
    with pytest.raises(GradCacheError, match=r"encode_image\(batch\['ss_view2'\]\)"):
        gradcache.forward_backward(objective, model, batch, CTX, 4)


@pytest.mark.parametrize("recipe", ["laip-cpu", "mefa-cpu"])
def test_objectives_that_cannot_be_cached_refuse_the_key_before_reading_data(recipe, tmp_path):
    from tbps.engine.train import TrainJob, train

    job = TrainJob(data_root=str(tmp_path / "no-such-data"), recipe=load_recipe(recipe, ["train.grad_cache_chunk=4"]),
                   out_dir=str(tmp_path / "run"), progress=False)
    with pytest.raises(ConfigError) as e:
        train(job)  # the refusal, not the missing dataset
    msg = str(e.value)
    assert "\n" not in msg and "grad_cache_chunk=4" in msg and recipe.removesuffix("-cpu") in msg
    gradcache.check_supported(load_recipe(recipe))  # without the key: nothing to refuse
    with pytest.raises(ConfigError, match="grad_cache_chunk"):
        load_recipe("tbps-clip-cpu", ["train.grad_cache_chunk=-1"])


def test_irra_refuses_the_key_only_where_mlm_runs_on_part_of_the_batch():
    """IRRA is cacheable, but ``losses.mlm.samples`` (MLM on the first k captions) cannot be split into
    chunks: refused when any part of the run (a stage, or the time after one ends) runs MLM with it,
    accepted when MLM is off wherever it is set."""
    key = "train.grad_cache_chunk=4"
    gradcache.check_supported(load_recipe("irra-cpu", [key]))
    with pytest.raises(ConfigError, match=r"'irra' .*losses.mlm.samples > 0") as e:
        gradcache.check_supported(load_recipe("irra-cpu", [key, "losses.mlm.samples=16"]))  # on in the later stage
    assert "\n" not in str(e.value)
    gradcache.check_supported(load_recipe("irra-cpu", [key, "losses.mlm.samples=16", "stages=[]",
                                                       "losses.mlm.weight=0"]))
    with pytest.raises(ConfigError, match="losses.mlm.samples"):  # on after a first stage that has it off ends
        gradcache.check_supported(load_recipe("irra-cpu", [
            key, "losses.mlm.samples=16", "stages=[{start: 0.0, end: 0.5, losses: {mlm: {weight: 0.0}}}]"]))


@pytest.mark.slow
def test_training_with_grad_cache_reaches_the_same_weights(tiny_dataset, micro_overrides, tmp_path):
    """End to end through tbps train: an epoch of the CPU recipe (no dropout) with chunks of 3 pairs
    out of 8 reaches the weights of the uncached run. SGD, so that float rounding stays rounding
    (Adam's normalisation turns a 1e-7 difference of a near-zero gradient into a full lr step)."""
    from tbps.engine.train import TrainJob, train

    runs = {}
    for name, extra in (("plain", []), ("cached", ["train.grad_cache_chunk=3"])):
        recipe = load_recipe("tbps-clip-cpu", micro_overrides + ["optim.name=sgd", "optim.lr=0.05", *extra])
        train(TrainJob(str(tiny_dataset), recipe, str(tmp_path / name), epochs=1, progress=False))
        runs[name] = torch.load(tmp_path / name / "last.pt", weights_only=False)
    assert runs["cached"]["global_step"] == runs["plain"]["global_step"] > 2
    a, b, start = runs["plain"]["model"], runs["cached"]["model"], _setup_weights(micro_overrides)
    assert max((a[k].float() - start[k].float()).abs().max().item() for k in a) > 1e-3  # it trained
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-5


def _setup_weights(overrides):
    """The initial weights of the runs above (seeded the way train() seeds them)."""
    import math

    from tbps.engine.runtime import seed_everything
    from tbps.models import create_model

    recipe = load_recipe("tbps-clip-cpu", overrides)
    seed_everything(recipe.train.seed)
    model = create_model(recipe.model)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(recipe.train.logit_scale_init))
    return model.state_dict()


# ----------------------------------------------------------------------------------- torchrun
def _rank_step(rank: int, world: int):
    """The engine's cached step (``epoch._cached_forward_backward``) on this rank's rows."""
    from tbps.engine.distributed import DistInfo
    from tbps.engine.epoch import Amp, _cached_forward_backward

    torch.set_num_threads(1)
    model, objective, batch = _setup("tbps-clip", dropout=0.0)
    b = 8 // world
    local = {k: v[rank * b:(rank + 1) * b] for k, v in batch.items()}
    module = torch.nn.ModuleDict({"model": model, "objective": objective})
    loop = SimpleNamespace(device=torch.device("cpu"), amp=Amp(False, torch.float32), module=module,
                           dist=DistInfo(rank, world, rank), objective=objective, model=model,
                           recipe=SimpleNamespace(train=SimpleNamespace(grad_cache_chunk=3)),
                           scaler=torch.amp.GradScaler("cpu", enabled=False))
    _, loss = _cached_forward_backward(loop, local, CTX)
    return loss, _grads(model, objective)


def _worker(rank: int, port: int, out_dir: str):
    info = join(rank, 2, port)
    loss, grads = _rank_step(rank, 2)
    torch.distributed.all_reduce(loss)
    if rank == 0:
        torch.save({"loss": loss / 2, "grads": grads}, os.path.join(out_dir, "dist.pt"))
    leave_distributed(info)


@pytest.mark.slow
def test_two_processes_with_grad_cache_equal_one_process_on_the_global_batch(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    dist = torch.load(tmp_path / "dist.pt")
    model, objective, batch = _setup("tbps-clip", dropout=0.0)
    out = objective(model, batch, CTX)
    loss = sum(v for k, v in out.items() if k.endswith("_loss"))
    loss.backward()
    assert abs(dist["loss"].item() - loss.item()) <= 1e-5
    assert _max_diff(dist["grads"], _grads(model, objective)) <= 1e-5
