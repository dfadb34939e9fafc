"""Independent references for tests/test_convert.py: tiny CLIP weights in each source's layout, and forwards
written from the published architectures (OpenAI CLIP / TBPS-CLIP / IRRA's ViT and text transformer in
(L, N, E) layout, RDE's token-selection layers with its per-caption loops), on plain tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# A tiny OpenAI-layout CLIP: ViT width 64 (1 head), 2 layers, 8-pixel patches at 32x16; text width 64, 2 layers.
CFG = {"embed_dim": 32, "quick_gelu": True,
       "vision_cfg": {"image_size": [32, 16], "layers": 2, "width": 64, "patch_size": 8},
       "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}}
ARCH = "convtest-vit"


def clip_state(seed: int = 0, image_size=(32, 16)) -> dict[str, torch.Tensor]:
    """Random weights in OpenAI's layout (= open_clip's for CLIP), with non-trivial LayerNorms."""
    import copy

    import open_clip

    cfg = copy.deepcopy(CFG)
    cfg["vision_cfg"]["image_size"] = list(image_size)
    open_clip.factory._MODEL_CONFIGS[ARCH] = cfg
    torch.manual_seed(seed)
    model = open_clip.create_model(ARCH)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for k in sd:
        if ".ln_" in k or k.startswith("ln_") or "visual.ln" in k:
            sd[k] += 0.1 * torch.randn_like(sd[k])
    return sd


def _block(x, p, pre, heads, mask=None):
    w = x.shape[-1]
    h = F.layer_norm(x, (w,), p[pre + "ln_1.weight"], p[pre + "ln_1.bias"])
    a, weights = F.multi_head_attention_forward(
        h, h, h, w, heads, p[pre + "attn.in_proj_weight"], p[pre + "attn.in_proj_bias"], None, None, False, 0.0,
        p[pre + "attn.out_proj.weight"], p[pre + "attn.out_proj.bias"], training=False, need_weights=True,
        attn_mask=mask, average_attn_weights=True)
    x = x + a
    h = F.layer_norm(x, (w,), p[pre + "ln_2.weight"], p[pre + "ln_2.bias"])
    h = F.linear(h, p[pre + "mlp.c_fc.weight"], p[pre + "mlp.c_fc.bias"])
    h = h * torch.sigmoid(1.702 * h)  # QuickGELU
    return x + F.linear(h, p[pre + "mlp.c_proj.weight"], p[pre + "mlp.c_proj.bias"]), weights


def _layers(p, pre):
    return len({k[len(pre):].split(".")[0] for k in p if k.startswith(pre)})


@torch.no_grad()
def ref_image_tokens(p, images, patch=8):
    """Every projected token (N, 1+P, D) and the last layer's head-averaged attention."""
    x = F.conv2d(images, p["visual.conv1.weight"], stride=patch).flatten(2).transpose(1, 2)
    cls = p["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], 1) + p["visual.positional_embedding"]
    w = x.shape[-1]
    x = F.layer_norm(x, (w,), p["visual.ln_pre.weight"], p["visual.ln_pre.bias"]).transpose(0, 1)
    for i in range(_layers(p, "visual.transformer.resblocks.")):
        x, attn = _block(x, p, f"visual.transformer.resblocks.{i}.", max(1, w // 64))
    x = F.layer_norm(x.transpose(0, 1), (w,), p["visual.ln_post.weight"], p["visual.ln_post.bias"])
    return x @ p["visual.proj"], attn


@torch.no_grad()
def ref_text_tokens(p, ids):
    """Every projected token (N, L, D) and the last layer's head-averaged (causal) attention."""
    L = ids.shape[1]
    x = (p["token_embedding.weight"][ids] + p["positional_embedding"]).transpose(0, 1)
    mask = torch.full((L, L), float("-inf")).triu_(1)
    w = x.shape[-1]
    for i in range(_layers(p, "transformer.resblocks.")):
        x, attn = _block(x, p, f"transformer.resblocks.{i}.", max(1, w // 64), mask)
    x = F.layer_norm(x.transpose(0, 1), (w,), p["ln_final.weight"], p["ln_final.bias"])
    return x @ p["text_projection"], attn


def ref_global(p, images, ids):
    """CLIP/IRRA/TBPS-CLIP features: projected CLS and end-of-text (argmax id) tokens, L2-normalised."""
    img, _ = ref_image_tokens(p, images)
    txt, _ = ref_text_tokens(p, ids)
    return F.normalize(img[:, 0], dim=-1), F.normalize(txt[torch.arange(len(ids)), ids.argmax(-1)], dim=-1)


# ---------------------------------------------------------------- RDE's TSE, as its code runs it
def tse_state(prefix: str, in_dim: int, dim: int, visual: bool, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    sd = {f"{prefix}linear.weight": r(dim, in_dim), f"{prefix}linear.bias": r(dim),
          f"{prefix}mlp.layers.0.weight": r(dim // 2, in_dim), f"{prefix}mlp.layers.0.bias": r(dim // 2),
          f"{prefix}mlp.layers.1.weight": r(dim, dim // 2), f"{prefix}mlp.layers.1.bias": r(dim)}
    if visual:
        sd.update({f"{prefix}fc.weight": r(dim, in_dim), f"{prefix}fc.bias": r(dim)})
    for i, n in enumerate((dim // 2, dim)):
        sd.update({f"{prefix}mlp.bns.{i}.weight": 1 + r(n), f"{prefix}mlp.bns.{i}.bias": r(n),
                   f"{prefix}mlp.bns.{i}.running_mean": r(n), f"{prefix}mlp.bns.{i}.running_var": 0.5 + r(n).abs(),
                   f"{prefix}mlp.bns.{i}.num_batches_tracked": torch.tensor(7)})
    return sd


def _l2(x):
    return x / (x.pow(2).sum(-1, keepdim=True).sqrt() + 1e-8)


def _mlp(p, pre, x):
    h = F.linear(x, p[pre + "layers.0.weight"], p[pre + "layers.0.bias"])
    h = (h - p[pre + "bns.0.running_mean"]) / torch.sqrt(p[pre + "bns.0.running_var"] + 1e-5)
    h = torch.relu(h * p[pre + "bns.0.weight"] + p[pre + "bns.0.bias"])
    return F.linear(h, p[pre + "layers.1.weight"], p[pre + "layers.1.bias"])


@torch.no_grad()
def ref_rde_image(p, tokens, attn, ratio=0.3):
    pre = "visul_emb_layer."
    attn = attn.clone()
    k = int((attn.size(1) - 1) * ratio)
    attn[:, :, 0] = -1
    top = attn[:, 0].topk(k, dim=-1)[1]
    out = []
    for b in range(tokens.shape[0]):
        x = _l2(tokens[b, top[b]])
        x = F.linear(x, p[pre + "fc.weight"], p[pre + "fc.bias"]) + _mlp(p, pre + "mlp.", x)
        out.append(x.max(0)[0])
    return torch.stack(out)


@torch.no_grad()
def ref_rde_text(p, tokens, ids, attn, ratio=0.3):
    pre = "texual_emb_layer."
    attn = attn.clone()
    bs = ids.shape[0]
    mask = (ids != 0).float()
    lengths = mask.sum(1) - 2
    k = int((attn.size(1) - 2) * ratio)
    eot = ids.argmax(-1)
    attn[torch.arange(bs), :, eot] = -1
    attn[torch.arange(bs), :, 0] = -1
    row = attn[torch.arange(bs), eot, :] * mask
    top = row.topk(k, dim=-1)[1]
    out = []
    for b in range(bs):
        x = _l2(tokens[b, top[b]])
        x = F.linear(x, p[pre + "linear.weight"], p[pre + "linear.bias"]) + _mlp(p, pre + "mlp.", x)
        n = int(min(lengths[b].item(), k))
        out.append(x[:n].max(0)[0])
    return torch.stack(out)
