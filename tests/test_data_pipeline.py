"""Samplers, augmentation and caption augmentation: seeded, sharded and resumable."""

import random
from collections import Counter

import torch

from tbps.data.dataset import Collate, TrainPairs
from tbps.data.layouts import load_annotations
from tbps.data.records import Record
from tbps.data.sampler import GlobalBatchSampler
from tbps.data.text_aug import TextAugmentConfig, augment_caption, random_deletion
from tbps.data.transforms import AUGMENT_POOL, AugmentConfig, PoolAugment


def test_identity_balanced_batches_hold_p_ids_times_k():
    pids = [i // 3 for i in range(30)] + [10]  # 10 ids with 3 items, one id with a single item
    s = GlobalBatchSampler(pids, batch_size=8, identity_k=4, seed=1)
    batches = list(s)
    assert len(batches) == len(s) == (11 * 4) // 8
    for b in batches:
        counts = Counter(pids[i] for i in b)
        assert sorted(counts.values()) == [4, 4]  # P = 2 identities x K = 4 (with replacement when short)


def test_ranks_split_the_global_batch_exactly():
    pids = list(range(40))
    single = list(GlobalBatchSampler(pids, batch_size=8, seed=3))
    ranks = [list(GlobalBatchSampler(pids, batch_size=4, seed=3, rank=r, world_size=2)) for r in range(2)]
    for b, (r0, r1) in enumerate(zip(*ranks)):
        assert r0 + r1 == single[b]


def test_epochs_differ_and_resume_skips_batches():
    s = GlobalBatchSampler(list(range(40)), batch_size=8, seed=0)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert e0 != e1 and sorted(sum(e0, [])) == sorted(sum(e1, []))
    s.set_epoch(1, start_batch=2)
    assert list(s) == e1[2:] and len(s) == len(e1) - 2


def test_random_deletion_keeps_a_word_and_drops_some():
    rng = random.Random(0)
    assert random_deletion("single", 0.99, rng) == "single"
    out = [random_deletion("a b c d e f g h i j", 0.5, rng) for _ in range(50)]
    assert all(o for o in out) and any(len(o.split()) < 10 for o in out)
    assert random_deletion("a b c", 0.0, rng) == "a b c"


def test_backtranslation_swapped_at_its_rate():
    rng = random.Random(0)
    picks = [augment_caption("orig", "paraphrase", rng, backtranslation_prob=0.3, deletion_prob=0) for _ in range(2000)]
    rate = picks.count("paraphrase") / len(picks)
    assert 0.25 < rate < 0.35
    assert augment_caption("orig", None, rng, backtranslation_prob=1.0, deletion_prob=0) == "orig"


def _pairs(tiny_dataset, **kw):
    records = load_annotations(tiny_dataset).split("train")
    return TrainPairs(records, (32, 16), mean=(0.5,) * 3, std=(0.25,) * 3, seed=7, **kw)


def test_augmentation_is_a_function_of_seed_epoch_and_index(tiny_dataset):
    ds = _pairs(tiny_dataset, augment=AugmentConfig(mvs=True, ss_views=True), text_augment=TextAugmentConfig())
    a, b = ds[3], ds[3]
    for key in ("image", "image_view2", "ss_view1", "ss_view2"):
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["ss_view1"], a["ss_view2"])  # two different strong views
    ds.set_epoch(1)
    assert not torch.equal(ds[3]["ss_view1"], a["ss_view1"])
    # the global torch RNG (dropout) is untouched by data augmentation in the main process
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    ds[0]
    assert torch.equal(torch.rand(1), expected)


def _one_at_a_time(pool: PoolAugment, x: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """The reference: torchvision's transforms called on one image, as a torchvision pipeline
    would (erasing after normalisation)."""
    from torchvision.transforms.functional import normalize

    erase = []
    if pool.config.hflip > 0:
        from torchvision.transforms import RandomHorizontalFlip

        x = RandomHorizontalFlip(pool.config.hflip)(x)
    for name in rng.choices(list(pool.config.pool), k=pool.config.num_ops):
        if name == "erasing":
            erase.append(pool.ops[name])
        else:
            x = pool.ops[name](x)
    x = normalize(x, pool.mean, pool.std)
    for op in erase:
        x = op(x)
    return x


def test_batched_augmentation_is_torchvision_one_image_at_a_time():
    """A batch's plans drawn one image at a time and applied together give torchvision's pixels
    bit for bit, and leave torch's generator where torchvision leaves it. (96, 48): no random crop
    box fits, the drawing shortcut; (40, 40): random boxes of several sizes in one batch."""
    for size in ((96, 48), (40, 40)):
        pool = PoolAugment(size, AugmentConfig(num_ops=3), (0.48, 0.46, 0.41), (0.27, 0.26, 0.28))
        images = torch.rand(120, 3, *size, generator=torch.Generator().manual_seed(0))
        refs, plans = [], []
        for k, x in enumerate(images):
            torch.default_generator.manual_seed(100 + k)
            refs.append(_one_at_a_time(pool, x, random.Random(k)))
            after = torch.get_rng_state()
            torch.default_generator.manual_seed(100 + k)
            plans.append(pool.plan(random.Random(k)))
            assert torch.equal(torch.get_rng_state(), after), (size, k, plans[-1])
        drawn = Counter(name for p in plans for name, params in p if params is not None)
        assert set(drawn) == set(AUGMENT_POOL) and min(drawn.values()) >= 3, drawn  # grayscale: p 0.1
        boxes = {params for p in plans for name, params in p if name == "resized_crop"}
        assert boxes == {(16, 0, 64, 48)} if size == (96, 48) else len(boxes) > 5, boxes
        out = pool.apply(images.clone(), plans)
        for k, ref in enumerate(refs):
            assert torch.equal(out[k], ref), (size, k, plans[k])
        assert torch.equal(pool(images[7], _seeded(random.Random(7), 107)), refs[7])  # one image


def test_flip_before_the_pool_is_torchvisions_and_mirrors_about_half():
    """``augment.hflip``: RandomHorizontalFlip(p) on every image before the pool's draws, bit for bit,
    from the same generator; the pool's own flip can undo it (a net mirror is still a coin toss)."""
    size = (96, 48)
    pool = PoolAugment(size, AugmentConfig(num_ops=1, hflip=0.5), (0.48, 0.46, 0.41), (0.27, 0.26, 0.28))
    images = torch.rand(200, 3, *size, generator=torch.Generator().manual_seed(1))
    refs, plans = [], []
    for k, x in enumerate(images):
        torch.default_generator.manual_seed(300 + k)
        refs.append(_one_at_a_time(pool, x, random.Random(k)))
        torch.default_generator.manual_seed(300 + k)
        plans.append(pool.plan(random.Random(k)))
    assert all(p[0][0] == "hflip" and len(p) == 2 for p in plans)
    flipped = sum(p[0][1] is not None for p in plans)
    assert 70 <= flipped <= 130, flipped
    out = pool.apply(images.clone(), plans)
    for k, ref in enumerate(refs):
        assert torch.equal(out[k], ref), (k, plans[k])
    plain = PoolAugment(size, AugmentConfig(num_ops=1), (0.48, 0.46, 0.41), (0.27, 0.26, 0.28))
    assert all(len(plain.plan(random.Random(k))) == 1 for k in range(20))  # off: no flip of its own


def _seeded(rng, seed):
    torch.default_generator.manual_seed(seed)
    return rng


def test_batch_items_equal_the_items_fetched_one_by_one(tiny_dataset):
    """``__getitems__`` (what the DataLoader calls) gives each item what fetching it alone gives:
    the plans line up with their images, the negative and the second view included."""
    ds = _pairs(tiny_dataset, augment=AugmentConfig(mvs=True, ss_views=True), text_augment=TextAugmentConfig())
    ds.negatives = torch.tensor([[(ri + 1) % len(ds.records), (ri + 2) % len(ds.records)] for ri in range(len(ds.records))])
    ds.set_epoch(3)
    indices = [5, 0, 9, 2, 5, len(ds) - 1]
    batch = ds.__getitems__(indices)
    for index, item in zip(indices, batch):
        alone = ds[index]
        assert item.keys() == alone.keys() >= {"image", "neg_image", "image_view2", "ss_view1", "ss_view2"}
        for key, value in alone.items():
            assert torch.equal(item[key], value) if torch.is_tensor(value) else item[key] == value, (index, key)
    assert not torch.equal(batch[0]["image"], batch[0]["image_view2"])


def test_augmentation_seeds_only_the_cpu_generator(tiny_dataset, monkeypatch):
    """Each item's augmentation is the one torch.manual_seed(seed) would give, without calling
    it (it also seeds, or queues with a stack trace, every accelerator's RNG: 8 ms a sample)."""
    import random as _random

    from tbps.data.dataset import _sample_seed

    ds = _pairs(tiny_dataset, augment=AugmentConfig(num_ops=3))
    ds.set_epoch(2)
    refs = []
    for i in (1, 4):
        rng = _random.Random(_sample_seed(ds.seed, ds.epoch, i))
        torch.manual_seed(rng.getrandbits(63))
        refs.append(_one_at_a_time(ds.pool, ds._load(i)[2], rng))

    def refuse(_seed):
        raise AssertionError("torch.manual_seed called per sample")

    monkeypatch.setattr(torch, "manual_seed", refuse)
    for i, ref in zip((1, 4), refs):
        assert torch.equal(ds[i]["image"], ref)


def test_cached_images_give_the_same_items(tiny_dataset):
    plain = _pairs(tiny_dataset, augment=AugmentConfig())
    cached = _pairs(tiny_dataset, augment=AugmentConfig())
    cached.cache_images(threads=2)
    for i in (0, 5, len(plain) - 1):
        assert torch.equal(plain[i]["image"], cached[i]["image"])


def test_pairs_remap_ids_and_collate_tokenises(tiny_dataset):
    from tbps.models import ModelSpec, get_tokenizer

    ds = _pairs(tiny_dataset)
    assert sorted(set(ds.item_pids())) == list(range(ds.num_identities))
    assert len(ds) == sum(len(r.captions) for r in ds.records)
    batch = Collate(get_tokenizer(ModelSpec(arch="micro-vit")))([ds[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, 32, 16) and batch["tokens"].shape == (4, 32)
    assert batch["pid"].dtype == torch.long


def test_collate_token_cache_gives_the_same_tokens_and_tokenises_each_caption_once(monkeypatch):
    import tbps.data.dataset as dataset_mod
    from tbps.models import ModelSpec, get_tokenizer

    tok = get_tokenizer(ModelSpec(arch="micro-vit"))
    seen = []

    def counting(captions):
        seen.extend(captions)
        return tok(captions)

    items = [{"caption": c, "pid": i % 2} for i, c in
             enumerate(["a man in red", "a woman with a bag", "a man in red", "grey coat, black shoes"])]
    cache = {}
    cached = Collate(counting, cache=cache)
    first = cached(items)
    assert seen == ["a man in red", "a woman with a bag", "grey coat, black shoes"]  # a repeat within a batch too
    again = cached(items[::-1] + [{"caption": "a child in blue", "pid": 0}])
    assert seen[3:] == ["a child in blue"]  # the next epoch tokenises only what it has not seen
    plain = Collate(tok)
    assert torch.equal(first["tokens"], plain(items)["tokens"])
    assert torch.equal(again["tokens"], plain(items[::-1] + [{"caption": "a child in blue", "pid": 0}])["tokens"])
    again["tokens"][0, 1] = 7  # a hook may edit the batch in place: the cached rows stay as they were
    assert torch.equal(cached(items)["tokens"], first["tokens"])
    monkeypatch.setattr(dataset_mod, "TOKEN_CACHE_LIMIT", len(cache))  # full: new captions pass through, uncached
    full = cached([{"caption": "a tall man", "pid": 1}] + items)
    assert "a tall man" not in cache and len(cache) == 4
    assert torch.equal(full["tokens"], plain([{"caption": "a tall man", "pid": 1}] + items)["tokens"])


def test_unreadable_image_is_reported_once_and_replaced(tmp_path, capsys):
    from PIL import Image

    good = tmp_path / "good.jpg"
    Image.new("RGB", (16, 32), "red").save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(good.read_bytes()[:40])  # header survives, data does not
    recs = [Record(bad, ("a",), 1, "train"), Record(good, ("b",), 2, "train")]
    ds = TrainPairs(recs, (32, 16), mean=(0.5,) * 3, std=(0.25,) * 3)
    item, again = ds[0], ds[0]
    assert item["caption"] == "b" and again["caption"] == "b"  # the neighbour stands in
    assert capsys.readouterr().err.count("skipping unreadable image") == 1
