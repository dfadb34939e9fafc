"""``TBPSModel``: an open_clip model with the token-level outputs TBPS recipes need.

``forward`` does no tokenisation, augmentation or device moves: it takes a batch of
preprocessed images (B, 3, H, W) and token ids (B, L) and returns features.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from tbps.models.spec import ModelSpec
from tbps.models.text_towers import text_tower


class TBPSModel(nn.Module):
    """Dual encoder over an open_clip ``CLIP`` / ``CustomTextCLIP``.

    Global features are the projected (not normalised) embeddings, (B, D). Token
    outputs are projected into the same D-dim space so cross-modal modules can mix them.
    """

    def __init__(self, clip: nn.Module, spec: ModelSpec):
        super().__init__()
        self.clip = clip
        self.spec = spec
        tower = text_tower(spec)
        # Optional parts: heads to spec.embed_dim (TextReID) and a text tower other than CLIP's own
        # (text_towers.py); made in this order, which a seeded run's initial weights depend on.
        clip_dim = int((spec.arch_config or {}).get("embed_dim") or self._clip_text_dim())
        out_dim = int(spec.embed_dim or clip_dim)
        self.image_head = nn.Linear(clip_dim, out_dim) if spec.embed_dim else None
        self.text_stream = None
        self.text_head = None
        if tower.build is not None:
            self.text_stream = tower.build(spec, out_dim)
            for p in self._clip_text_parameters():  # the CLIP text tower is not used: keep it out of training
                p.requires_grad_(False)
        elif spec.embed_dim:
            self.text_head = nn.Linear(clip_dim, out_dim)
        self.tse = None  # RDE's token-selection branch (models/rde.py), for converted RDE checkpoints
        if spec.tse:
            from tbps.models.rde import TokenSelection

            self.tse = TokenSelection(clip_dim, int(spec.tse.get("dim", 1024)), float(spec.tse.get("ratio", 0.3)))

    # ----------------------------------------------------------------- properties
    @property
    def logit_scale(self) -> nn.Parameter:
        """Log of the learnable inverse temperature (CLIP initialises it to log(1/0.07))."""
        return self.clip.logit_scale

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), the inverse temperature the contrastive losses use. With
        ``logit_scale_cap`` set (``train.logit_scale_clamp: forward``) its value is capped there in
        every forward while the gradient flows as if uncapped, as TBPS-CLIP's code does
        (``logit_scale.data = clamp(logit_scale.exp().data, max=100)``)."""
        s = self.logit_scale.exp()
        cap = getattr(self, "logit_scale_cap", None)
        if cap is None:
            return s
        return s - (s - s.clamp(max=cap)).detach()  # value min(s, cap), d/ds = 1

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the images the visual tower takes."""
        size = getattr(self.clip.visual, "image_size", None)
        if size is None:  # timm trunks
            size = self.clip.visual.trunk.patch_embed.img_size
        if isinstance(size, int):
            size = (size, size)
        return tuple(int(s) for s in size)

    def _clip_text_dim(self) -> int:
        with torch.no_grad():
            return int(self.clip.encode_text(torch.zeros(1, self.context_length, dtype=torch.long)).shape[-1])

    def _clip_text_parameters(self):
        clip = self.clip
        if hasattr(clip, "text"):
            yield from clip.text.parameters()
            return
        for name in ("token_embedding", "transformer", "ln_final"):
            yield from getattr(clip, name).parameters()
        for name in ("positional_embedding", "text_projection"):
            p = getattr(clip, name, None)
            if isinstance(p, nn.Parameter):
                yield p
            elif isinstance(p, nn.Module):
                yield from p.parameters()

    def prepare_vocabulary(self, captions: Iterable[str]) -> dict | None:
        """Take in the training vocabulary before training: the words of ``captions`` (already
        cleaned by the caller, e.g. ``clean_caption(c, 10**6)``) go into the text tower's frozen
        dictionary, and are recorded in the spec (``text_tower.vocabulary`` and ``word_pairs``, saved
        in checkpoints).
        Returns ``{"words": N, "cached": bool, ...}``, or None for towers without
        such a step (CLIP's own, Hugging Face). Call it in the main process before DataLoader
        workers start."""
        tower = text_tower(self.spec)
        if tower.prepare is None:
            return None
        return tower.prepare(self.spec, self.text_stream, [tower.split_words(c) for c in captions])

    @property
    def embed_dim(self) -> int:
        """D, the size of the projected global features of both towers."""
        if self.spec.embed_dim:
            return int(self.spec.embed_dim)
        if self.tse is not None:  # RDE: the global and the token-selection embeddings, concatenated
            return int(self.clip.text_projection.shape[1]) + self.tse.dim
        with torch.no_grad():
            return int(self.clip.encode_text(torch.zeros(1, self.context_length, dtype=torch.long)).shape[-1])

    @property
    def context_length(self) -> int:
        """L, the token positions of the CLIP text tower."""
        if hasattr(self.clip, "context_length"):
            return int(self.clip.context_length)
        return int(self.clip.text.context_length)

    def _text_transformer_name(self) -> str:
        """Where CLIP's text transformer lives: on the CLIP itself, or on its text tower (CustomTextCLIP)."""
        return "clip.transformer" if hasattr(self.clip, "transformer") else "clip.text.transformer"

    def _text_blocks(self):
        return self.get_submodule(self._text_transformer_name()).resblocks

    # ------------------------------------------------------------------- settings
    def set_text_attention_dropout(self, p: float) -> None:
        """Dropout on the text encoder's attention weights (TBPS-CLIP uses 0.05)."""
        for block in self._text_blocks():
            attn = block.attn
            if isinstance(attn, nn.MultiheadAttention):
                attn.dropout = float(p)
            else:  # open_clip's custom Attention
                attn.attn_drop = nn.Dropout(p) if not hasattr(attn, "attn_drop") else attn.attn_drop
                attn.attn_drop.p = float(p)

    def freeze_patch_embedding(self) -> None:
        """Freeze the image patch-embedding conv (a TBPS-CLIP trick for stability)."""
        visual = self.clip.visual
        if hasattr(visual, "conv1"):
            visual.conv1.requires_grad_(False)
        elif hasattr(visual, "trunk") and hasattr(visual.trunk, "patch_embed"):
            visual.trunk.patch_embed.requires_grad_(False)
        else:
            raise ValueError(f"{type(visual).__name__} has no patch embedding to freeze")

    def compile_towers(self) -> list[str]:
        """Compile in place with ``torch.compile`` (``nn.Module.compile``: the same parameters,
        state-dict keys and results up to float rounding) the image tower's transformer (the whole
        tower where it has none, e.g. a ResNet or timm trunk) and the text tower's transformer (or the
        text stream). Returns the names of the compiled modules. Compilation happens at the first
        call; a new input shape or grad mode compiles again."""
        visual = self.clip.visual
        image = "clip.visual.transformer" if hasattr(visual, "transformer") else "clip.visual"
        if self.text_stream is not None:
            text = "text_stream"
        elif self._clip_text_tower():
            text = self._text_transformer_name()
        else:
            text = None
        names = [n for n in (image, text) if n is not None]
        for name in names:
            self.get_submodule(name).compile()
        return names

    # ------------------------------------------------------------------- encoders
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) projected global image features."""
        if self.tse is not None:
            return self.tse.encode_image(self.clip, images)
        feats = self.clip.encode_image(images)
        return self.image_head(feats) if self.image_head is not None else feats

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, D) projected global text features."""
        if self.tse is not None:
            return self.tse.encode_text(self.clip, tokens)
        if self.text_stream is not None:
            return self.text_stream(tokens)
        if self._cut_clip(tokens):
            return self.text_tokens(tokens)[0]
        feats = self.clip.encode_text(tokens)
        return self.text_head(feats) if self.text_head is not None else feats

    def encode_text_unpadded(self, tokens: torch.Tensor) -> torch.Tensor:
        """``encode_text`` without the work on padding: the columns after the batch's last real
        token are cut off first (:meth:`text_length`). The same features up to float rounding (about
        1e-6), in about half the time for queries of 12-20 tokens out of a context of 48-77."""
        return self.encode_text(tokens[:, :self.text_length(tokens)])

    def text_length(self, tokens: torch.Tensor) -> int:
        """How many leading columns of (B, L) ``tokens`` the text tower needs: through the batch's last
        non-padding token where the tower is CLIP's causal transformer pooled at the end token (a later
        column changes no output at an earlier position, and padding is masked out downstream), else
        all L. ``encode_text`` and ``text_tokens`` take the cut tokens; training passes over short
        texts cut them (LAIP's phrases: a few tokens in a 48-token context)."""
        keep = self._unpadded_length(tokens)
        return tokens.shape[1] if keep is None else keep

    def _unpadded_length(self, tokens: torch.Tensor) -> int | None:
        """Token positions :meth:`text_length` keeps; None where cutting does not apply (another
        text tower, another pooling, no causal mask) or cuts nothing."""
        clip = self.clip
        if not self._clip_text_tower() or getattr(clip, "text_pool_type", None) != "argmax":
            return None
        if not all(hasattr(clip, n) for n in ("positional_embedding", "transformer", "ln_final")):
            return None
        mask = getattr(clip, "attn_mask", None)
        if mask is None or tokens.ndim != 2 or mask.shape != (tokens.shape[1], tokens.shape[1]):
            return None
        seen = self.__dict__.get("_causal_seen")  # (mask, its version, verdict): the check costs more than a query
        if seen is None or seen[0] is not mask or seen[1] != mask._version:
            seen = self.__dict__["_causal_seen"] = (mask, mask._version, _is_causal(mask))
        if not seen[2]:
            return None
        # Through the last non-padding token (open_clip pads with 0): the end token for plain captions,
        # and also for masked copies, whose [MASK] id may exceed the end token's.
        real = (tokens != 0).any(dim=0).nonzero()
        keep = int(real[-1]) + 1 if len(real) else 1
        return keep if keep < tokens.shape[1] else None

    def _cut_clip(self, tokens: torch.Tensor) -> bool:
        """Whether ``tokens`` is shorter than CLIP's context (cut by :meth:`text_length`), so the
        positional embedding and the causal mask are cut to match; open_clip's own ``encode_text``
        takes the full context only."""
        return self._clip_text_tower() and tokens.shape[1] < self.clip.positional_embedding.shape[0]

    def _clip_text_tower(self) -> bool:
        """Whether text goes through CLIP's own text transformer (no TSE, no text stream, and an
        open_clip CLIP rather than a tower with its own embedding such as a Hugging Face one)."""
        return self.tse is None and self.text_stream is None and hasattr(self.clip, "token_embedding")

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "image_features": self.encode_image(images),
            "text_features": self.encode_text(tokens),
            "logit_scale": self.scale(),
        }

    def image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> global (B, D) and patch tokens (B, N, D), both projected."""
        pooled, tokens = self._clip_image_tokens(images)
        if self.image_head is not None:
            pooled, tokens = self.image_head(pooled), self.image_head(tokens)
        return pooled, tokens

    def _clip_image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        visual = self.clip.visual
        if hasattr(visual, "_embeds") and hasattr(visual, "_pool"):  # open_clip ViT
            x = visual.transformer(visual._embeds(images))  # (B, 1+N, W)
            pooled, tokens = visual._pool(x)  # (B, W), (B, N, W)
            if visual.proj is not None:
                pooled, tokens = pooled @ visual.proj, tokens @ visual.proj
            return pooled, tokens
        if hasattr(visual, "trunk"):  # timm trunk (EVA02)
            trunk = visual.trunk
            feats = trunk.forward_features(images)  # (B, prefix+N, C)
            n_prefix = getattr(trunk, "num_prefix_tokens", 1)
            # The projection to the joint space is the trunk's own head when open_clip's config has
            # no timm_proj (EVA02-B-16: trunk.head 768 -> 512, visual.head empty); tokens take the
            # same fc_norm + head path as the pooled token.
            pooled = visual.head(trunk.forward_head(feats))
            tokens = feats[:, n_prefix:]
            tokens = trunk.head(getattr(trunk, "fc_norm", nn.Identity())(tokens))
            return pooled, visual.head(tokens)
        if hasattr(visual, "attnpool"):  # ModifiedResNet
            x = visual.stem(images)
            x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))  # (B, C, h, w)
            pooled = visual.attnpool(x)
            pool = visual.attnpool
            # Value path of the attention pool applied to every position: a D-dim token per cell.
            tokens = pool.c_proj(pool.v_proj(x.flatten(2).transpose(1, 2)))  # (B, h*w, D)
            return pooled, tokens
        raise TypeError(f"token outputs not supported for {type(visual).__name__}")

    def text_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, L) ids -> global (B, D), word tokens (B, L, D), and a (B, L) mask of real tokens."""
        if self.text_stream is not None:
            return self.text_stream.tokens(tokens)
        pooled, x, mask = self._clip_text_tokens(tokens)
        if self.text_head is not None:
            pooled, x = self.text_head(pooled), self.text_head(x)
        return pooled, x, mask

    def _clip_text_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from open_clip.transformer import text_global_pool

        clip = self.clip
        if hasattr(clip, "token_embedding"):  # CLIP: text tower inlined in the model
            cast, n = clip.transformer.get_cast_dtype(), tokens.shape[1]  # n < the context: cut by text_length
            x = clip.token_embedding(tokens).to(cast) + clip.positional_embedding[:n].to(cast)
            causal = clip.attn_mask[:n, :n] if clip.attn_mask is not None else None
            x = clip.ln_final(clip.transformer(x, attn_mask=causal))  # (B, L, W)
            pooled = text_global_pool(x, tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
            proj = clip.text_projection
        else:  # CustomTextCLIP with an open_clip TextTransformer
            text = clip.text
            was = text.output_tokens
            text.output_tokens = True
            try:
                pooled, x = text(tokens)
            finally:
                text.output_tokens = was
            proj = None  # TextTransformer already projected `pooled`
            x = x @ text.text_projection if text.text_projection is not None else x
            mask = tokens != 0
            return pooled, x, mask
        if proj is not None:
            if isinstance(proj, nn.Linear):
                pooled, x = proj(pooled), proj(x)
            else:
                pooled, x = pooled @ proj, x @ proj
        mask = tokens != 0  # open_clip pads with 0
        return pooled, x, mask



def _is_causal(mask: torch.Tensor) -> bool:
    """Whether ``mask`` (L, L) is the additive causal mask: -inf above the diagonal, 0 elsewhere."""
    above = torch.ones_like(mask, dtype=torch.bool).triu(1)
    return bool(torch.equal(torch.isneginf(mask), above) and not mask[~above].any())
