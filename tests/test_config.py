"""Recipes load, inherit and override; mistakes name the key."""

import json

import pytest

from tbps.recipes.config import ConfigError, list_recipes, load_recipe


def test_every_shipped_recipe_loads():
    names = list_recipes()
    assert {"tbps-clip", "tbps-clip-simplified", "tbps-clip-cpu"} <= set(names)
    for name in names:
        r = load_recipe(name)
        assert r.name == name


def test_paper_settings_of_tbps_clip():
    r = load_recipe("tbps-clip")
    assert (r.model.arch, r.model.pretrained, r.model.image_size) == ("ViT-B-16", "openai", (224, 224))
    assert (r.optim.lr, r.optim.betas, r.optim.weight_decay, r.train.epochs) == (1e-4, (0.9, 0.98), 0.02, 5)
    assert r.data.batch_size == 80 and r.model.text_attn_dropout == 0.05 and r.model.freeze_patch_embed
    assert r.losses["ss"]["weight"] == 0.4 and r.losses["citc"]["weight"] == 0.1 and r.losses["mvs"]["enabled"]


def test_simplified_inherits_and_switches_losses_off():
    r = load_recipe("tbps-clip-simplified")
    assert r.model.arch == "ViT-B-16" and r.optim.lr == 1e-4  # inherited
    assert r.losses["ss"]["weight"] == 0 and r.losses["citc"]["weight"] == 0 and not r.losses["mvs"]["enabled"]
    assert r.losses["nitc"]["weight"] == 1.0 and r.losses["ritc"]["weight"] == 1.0


def test_overrides_are_typed():
    r = load_recipe("tbps-clip-cpu", ["optim.lr=3e-4", "data.batch_size=16", "model.image_size=[64, 32]"])
    assert r.optim.lr == 3e-4 and r.data.batch_size == 16 and r.model.image_size == (64, 32)


@pytest.mark.parametrize("override,match", [
    ("optim.lrr=1", "optim: unknown key"),
    ("bogus.x=1", "unknown section"),
    ("optim.lr", "not KEY=VALUE"),
    ("model.colour=1", "unknown model option"),
])
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_recipe("tbps-clip-cpu", [override])


def test_a_list_of_bases_merges_left_to_right_before_the_files_own_keys(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("optim: {lr: 1.0e-3, weight_decay: 0.1}\ntrain: {epochs: 3}\n")
    b.write_text("optim: {lr: 2.0e-3}\ndata: {batch_size: 8}\n")
    (tmp_path / "ab.yaml").write_text(f"base: {json.dumps([str(a), str(b)])}\ntrain: {{epochs: 4}}\n")
    r = load_recipe(str(tmp_path / "ab.yaml"))
    assert (r.optim.lr, r.optim.weight_decay, r.data.batch_size, r.train.epochs, r.name) == (2e-3, 0.1, 8, 4, "ab")
    (tmp_path / "ba.yaml").write_text(f"base: {json.dumps([str(b), str(a)])}\n")
    r = load_recipe(str(tmp_path / "ba.yaml"))
    assert (r.optim.lr, r.data.batch_size, r.train.epochs) == (1e-3, 8, 3)
    (tmp_path / "loop.yaml").write_text(f"base: {json.dumps([str(a), str(tmp_path / 'loop.yaml')])}\n")
    with pytest.raises(ConfigError, match="inherits from itself"):
        load_recipe(str(tmp_path / "loop.yaml"))
    (tmp_path / "bad.yaml").write_text("base: [tbps-clip, 3]\n")
    with pytest.raises(ConfigError, match="base is a recipe name or a list of them"):
        load_recipe(str(tmp_path / "bad.yaml"))


def test_shipped_parts_are_not_recipes_and_the_cpu_recipes_share_one():
    assert not [n for n in list_recipes() if n.startswith("_")]
    with pytest.raises(ConfigError, match="^_cpu-settings is a part of other recipes"):
        load_recipe("_cpu-settings")
    for name in ("tbps-clip-cpu", "irra-cpu", "mefa-cpu", "laip-cpu"):  # the part, under each paper recipe
        r = load_recipe(name)
        assert (r.data.augment.num_ops, r.optim.warmup_epochs, r.optim.fused, r.train.attention) == (1, 4.0, True, "math")
        assert r.name == name


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(ConfigError, match="tbps-clip-cpu"):
        load_recipe("no-such-recipe")
