"""Every tiny architecture runs forward and backward; token outputs agree with the global ones."""

import pytest
import torch

from tbps.recipes.config import load_recipe
from tbps.models import ModelSpec, create_model, get_tokenizer, list_architectures
from tbps.models.spec import ModelError
from tbps.objectives import StepContext, build_objective


@pytest.mark.parametrize("arch", list_architectures()["tiny"])
def test_tiny_arch_forward_backward_all_params_get_grad(arch):
    torch.manual_seed(0)
    model = create_model(ModelSpec(arch=arch))
    tok = get_tokenizer(model.spec)
    h, w = model.image_size
    out = model(torch.randn(3, 3, h, w), tok(["a man in a red coat", "a woman", "a child with a bag"]))
    loss = (out["image_features"] @ out["text_features"].t()).logsumexp(1).mean() * out["logit_scale"]
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"


def test_token_outputs_match_global_features():
    torch.manual_seed(0)
    model = create_model(ModelSpec(arch="micro-vit")).eval()
    tok = get_tokenizer(model.spec)
    x, t = torch.randn(2, 3, *model.image_size), tok(["a man in a red coat", "a woman"])
    g, patches = model.image_tokens(x)
    assert torch.allclose(g, model.encode_image(x), atol=1e-5)
    h, w = model.image_size
    assert patches.shape == (2, (h // 8) * (w // 8), g.shape[-1])  # patch 8, projected to D
    tg, words, mask = model.text_tokens(t)
    assert torch.allclose(tg, model.encode_text(t), atol=1e-5)
    assert words.shape[:2] == t.shape and words.shape[-1] == tg.shape[-1]
    # sot + 6 words + eot for the first caption; sot + 2 + eot for the second
    assert mask.sum(1).tolist() == [8, 4]


def test_text_attention_dropout_is_set_and_active_in_training():
    model = create_model(ModelSpec(arch="micro-vit", text_attn_dropout=0.5))
    blocks = model.clip.transformer.resblocks
    assert all(b.attn.dropout == 0.5 for b in blocks)
    tok = get_tokenizer(model.spec)(["a man in a long red coat with a black backpack"])
    model.train()
    a, b = model.encode_text(tok), model.encode_text(tok)
    assert not torch.allclose(a, b)
    model.eval()
    assert torch.allclose(model.encode_text(tok), model.encode_text(tok))


def test_position_embeddings_interpolated_for_non_square_input(tmp_path):
    """Square pretrained weights (as CLIP's) loaded into a 2:1 model: the grid is resized."""
    torch.manual_seed(0)
    square = create_model(ModelSpec(arch="micro-vit", image_size=(32, 32)))
    weights = tmp_path / "square.pt"
    torch.save(square.clip.state_dict(), weights)
    tall = create_model(ModelSpec(arch="micro-vit", image_size=(64, 32), pretrained=str(weights)))
    pos = tall.clip.visual.positional_embedding
    assert pos.shape[0] == 1 + 8 * 4  # (64/8) x (32/8) patches + class token
    assert torch.equal(pos[0], square.clip.visual.positional_embedding[0])  # class token kept
    # a bicubic resize of a 4x4 grid to 8x4: columns keep their values' range, not random ones
    old = square.clip.visual.positional_embedding[1:].reshape(4, 4, -1)
    new = pos[1:].reshape(8, 4, -1)
    assert torch.allclose(new.mean(0), old.mean(0), atol=0.15)
    assert torch.equal(tall.clip.visual.conv1.weight, square.clip.visual.conv1.weight)
    tall.encode_image(torch.randn(1, 3, 64, 32))


def test_unknown_architecture_and_missing_weights_give_clear_errors():
    with pytest.raises(ModelError, match="unknown architecture 'ViT-Q-99'"):
        create_model(ModelSpec(arch="ViT-Q-99"))


def test_paper_architectures_are_known_to_open_clip():
    from tbps.models.spec import arch_config

    for arch in list_architectures()["paper"]:
        cfg = arch_config(arch)
        assert cfg["embed_dim"] in (512, 1024)


def test_unknown_text_tower_type_is_a_model_error_naming_the_known_ones():
    spec = ModelSpec(arch="micro-vit", text_tower={"type": "lstm"})
    for build in (create_model, get_tokenizer):
        with pytest.raises(ModelError, match=r"'lstm'.*\['frozen-words', 'hf'\].*null"):
            build(spec)


def test_text_tower_registry_dispatches_by_type(tmp_path, monkeypatch):
    from tbps.models.text_stream import FrozenWordStream, WordTokenizer
    from tbps.models.text_towers import CLIP_TOWER, TEXT_TOWERS, text_tower

    assert text_tower(ModelSpec()) is CLIP_TOWER and text_tower(ModelSpec(text_tower={})) is CLIP_TOWER
    assert text_tower(ModelSpec(text_tower={"source": "random"})) is TEXT_TOWERS["frozen-words"]  # the default type
    assert text_tower(ModelSpec(text_tower={"type": "hf"})) is TEXT_TOWERS["hf"]
    monkeypatch.setenv("TBPS_CACHE", str(tmp_path))
    # dim 7: a word dictionary of its own (dictionaries are shared per encoder in the process)
    model = create_model(ModelSpec(arch="micro-vit", text_tower={"type": "frozen-words", "source": "random", "dim": 7}))
    assert isinstance(model.text_stream, FrozenWordStream) and isinstance(get_tokenizer(model.spec), WordTokenizer)
    clip = create_model(ModelSpec(arch="micro-vit"))
    assert clip.text_stream is None and clip.prepare_vocabulary(["a man in a red coat"]) is None
