"""Property-based fuzzing of the recipe override parser (`section.key=value`, recipes/config.py):
whatever a user types, loading a recipe either succeeds or raises ConfigError (one line, exit 2),
never another exception; valid values of each field type round-trip exactly."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tbps.recipes.config import ConfigError, apply_overrides, load_recipe, load_recipe_dict, recipe_from_dict

BASE = load_recipe_dict("tbps-clip-cpu")
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Real keys (so the fuzzed values reach the typed checks) and junk keys (so the key parser is fuzzed).
KEYS = ["data.batch_size", "data.num_workers", "data.identity_k", "data.max_words", "data.augment.num_ops", "data.augment.hflip",
        "data.augment.pool", "data.text_augment.deletion_prob", "data.cache_images", "optim.lr", "optim.betas",
        "optim.name", "optim.lr_factors", "optim.milestones", "optim.momentum", "train.epochs", "train.amp",
        "train.select_metric", "train.seed", "model.image_size", "model.arch", "model.mean", "model.context_length",
        "model.text_tower", "model.embed_dim", "losses", "losses.citc.weight", "stages", "name", "objective", "data",
        "optim", "model"]
VALUE_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "null", "~", "nan", ".nan", "-.inf", "1e400", "-1", "0", "2.5", "true", "[1, 1]", "[1,",
                     "{a: 1}", "{a: -1}", "!!python/object:os.system ls", "&a [*a]", "[[[[[[[[[[", "'x", "- a\n- b",
                     "3e-4", "0x10", "1_000", "[16, 8]", "[-8, 8]", "[0.9, 0.98]", "[1, 2, 3]", "yes", "@", "%x",
                     "9" * 400]),
    st.integers().map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.lists(st.one_of(st.integers(-5, 300), st.floats(), st.text(max_size=4)), max_size=4).map(str),
)
OVERRIDE = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), VALUE_TEXT),
    st.text(max_size=60),  # anything at all, '=' or not
    st.builds(lambda k, v: f"{k}={v}", st.text(alphabet="ab.= _\n", max_size=12), VALUE_TEXT),
)


@FAST
@given(st.lists(OVERRIDE, min_size=1, max_size=3))
def test_any_override_is_a_recipe_or_a_config_error(overrides):
    try:
        recipe = recipe_from_dict(apply_overrides(BASE, overrides))
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)  # printed as one line
        return
    # A recipe that loads holds finite, in-range numbers where the checks say so.
    assert recipe.data.batch_size > 0 and isinstance(recipe.data.batch_size, int)
    assert not isinstance(recipe.data.batch_size, bool)
    assert recipe.train.epochs > 0 and recipe.data.num_workers >= 0
    assert math.isfinite(recipe.optim.lr) and recipe.optim.lr >= 0
    assert all(math.isfinite(b) and 0 <= b < 1 for b in recipe.optim.betas)
    assert recipe.model.image_size is None or all(isinstance(x, int) and x > 0 for x in recipe.model.image_size)


@FAST
@given(batch=st.integers(1, 10**6), workers=st.integers(0, 64),
       lr=st.floats(0, 10, allow_nan=False, allow_infinity=False), deletion=st.floats(0, 1),
       betas=st.tuples(st.floats(0, 0.999), st.floats(0, 0.999)), amp=st.booleans(),
       size=st.one_of(st.none(), st.tuples(st.integers(8, 512), st.integers(8, 512))),
       name=st.sampled_from(["adamw", "adam", "sgd", "lamb"]), epochs=st.integers(1, 1000))
def test_valid_values_round_trip(batch, workers, lr, deletion, betas, amp, size, name, epochs):
    """Each value, written as the CLI receives it (repr/YAML text), loads back exactly."""
    def yaml_text(x):
        if x is None:
            return "null"
        if isinstance(x, bool):
            return "true" if x else "false"
        if isinstance(x, tuple):
            return "[" + ", ".join(yaml_text(v) for v in x) + "]"
        return repr(x)

    r = recipe_from_dict(apply_overrides(BASE, [
        f"data.batch_size={batch}", f"data.num_workers={workers}", f"optim.lr={yaml_text(lr)}",
        f"data.text_augment.deletion_prob={yaml_text(deletion)}", f"optim.betas={yaml_text(betas)}",
        f"train.amp={yaml_text(amp)}", f"model.image_size={yaml_text(size)}", f"optim.name={name}",
        f"train.epochs={epochs}"]))
    assert (r.data.batch_size, r.data.num_workers, r.optim.lr, r.data.text_augment.deletion_prob) == \
        (batch, workers, lr, deletion)
    assert (r.optim.betas, r.train.amp, r.model.image_size, r.optim.name, r.train.epochs) == \
        (betas, amp, size, name, epochs)
    # ...and the recipe round-trips through its dict (what config.yaml and a checkpoint store)
    assert recipe_from_dict(r.to_dict()) == r


@pytest.mark.parametrize("item", ["optim.lr=", "=1", ".=1", "a..b=1", "optim. lr=1", "optim.lr=[1",
                                  "optim.lr=!!python/object/apply:os.system [ls]", "x" * 10 + "=" + "[" * 2000])
def test_known_nasty_overrides_are_config_errors(item):
    with pytest.raises(ConfigError):
        load_recipe("tbps-clip-cpu", [item])
