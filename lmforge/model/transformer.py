"""The decoder-only Transformer, readable top to bottom.

    input_ids [B, T] -> embed_tokens (x sqrt(hidden) for Gemma; + embed_positions for learned positions)
      -> num_hidden_layers x Block:  x + attn(norm(x)),  x + mlp(norm(x))   (norm_position "pre";
         Gemma's "sandwich" also norms each sublayer's output, OLMo 2's "post" only its output)
      -> norm -> lm_head -> logits [B, T, V] (tanh soft-capped for Gemma 2)

Layers may differ in their attention window (Gemma's alternating sliding/global layers): each
distinct window gets one mask, and a layer picks its own; Gemma 3's sliding layers also have their
own RoPE base. Parameter names are Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...),
so conversion is a key map and adapter/quantization targets need no translation.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .layers import MLP, Attention, MoE, RotaryEmbedding, load_balancing_loss, make_norm, rope_attention_factor


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        c = config
        self.window = c.layer_window(layer_idx)
        self.local_rope = self.window is not None and c.rope_local_theta is not None
        scaling = None if self.local_rope else c.rope_scaling
        scale = (c.query_pre_attn_scalar or c.head_dim) ** -0.5 * rope_attention_factor(
            scaling, c.max_position_embeddings
        ) ** 2

        def norm():
            return make_norm(c.norm, c.hidden_size, c.norm_eps, c.norm_weight_offset)

        self.self_attn = Attention(
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            layer_idx,
            qkv_bias=c.attention_bias,
            out_bias=c.attention_out_bias,
            qk_norm=c.qk_norm,
            norm_eps=c.norm_eps,
            norm_offset=c.norm_weight_offset,
            scale=None if scale == c.head_dim**-0.5 else scale,
            softcap=c.attn_logit_softcapping,
        )
        if c.num_experts:
            self.mlp = MoE(
                c.hidden_size, c.intermediate_size, c.num_experts, c.num_experts_per_tok, c.activation, c.norm_topk_prob
            )
        else:
            self.mlp = MLP(c.hidden_size, c.intermediate_size, c.activation, c.gated_mlp, c.mlp_bias)
        # HF's names: in "pre" blocks post_attention_layernorm is the norm *before* the MLP (Llama's
        # naming); in "sandwich"/"post" blocks it norms the attention output and the MLP has its own pair.
        self.norm_position = c.norm_position
        self.input_layernorm = norm() if c.norm_position != "post" else nn.Identity()
        self.post_attention_layernorm = norm()
        if c.norm_position != "pre":
            self.pre_feedforward_layernorm = norm() if c.norm_position == "sandwich" else nn.Identity()
            self.post_feedforward_layernorm = norm()

    def forward(self, x, rope, mask, kv_cache=None, start_pos: int = 0, is_causal: bool = False):
        """Returns (x, router_logits or None)."""
        h = self.self_attn(self.input_layernorm(x), rope, mask, kv_cache, start_pos, is_causal)
        if self.norm_position == "pre":
            x = x + h
            h = self.mlp(self.post_attention_layernorm(x))
        else:
            x = x + self.post_attention_layernorm(h)
            h = self.mlp(self.pre_feedforward_layernorm(x))
        router_logits = None
        if isinstance(h, tuple):
            h, router_logits = h
        if self.norm_position != "pre":
            h = self.post_feedforward_layernorm(h)
        return x + h, router_logits


class ScaledEmbedding(nn.Embedding):
    """Gemma's token embedding: the looked-up rows x sqrt(hidden_size), the scale rounded to the
    weights' dtype as HF does (the tied lm_head uses the unscaled weights)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, scale: float):
        super().__init__(num_embeddings, embedding_dim)
        self.scale = scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * torch.tensor(self.scale, dtype=self.weight.dtype)


class Backbone(nn.Module):
    """HF's `model.` prefix: embeddings, blocks and the final norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        if c.scale_embeddings:
            self.embed_tokens = ScaledEmbedding(c.vocab_size, c.hidden_size, c.hidden_size**0.5)
        else:
            self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        if c.position == "learned":
            self.embed_positions = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.layers = nn.ModuleList(Block(c, i) for i in range(c.num_hidden_layers))
        self.norm = make_norm(c.norm, c.hidden_size, c.norm_eps, c.norm_weight_offset)
        self.make_rotary(c)
        self.gradient_checkpointing = False

    def make_rotary(self, c: ModelConfig, device=None) -> None:
        """RoPE tables (non-persistent buffers): `rotary` for every layer, and `rotary_local` for
        sliding layers with their own base (Gemma 3); also rebuilt after loading on the meta device."""
        if c.position != "rope":
            return
        rotary_dim = int(c.head_dim * c.partial_rotary_factor)
        self.rotary = RotaryEmbedding(rotary_dim, c.rope_theta, c.rope_scaling).to(device)
        if any(block.local_rope for block in self.layers):
            self.rotary_local = RotaryEmbedding(rotary_dim, c.rope_local_theta).to(device)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)
        # GPT-2 scaled init: residual projections shrink with depth so the residual stream stays O(1).
        std = config.initializer_range / math.sqrt(2 * config.num_hidden_layers)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=std)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)

    def reset_buffers(self, device=None) -> None:
        """Recreate non-persistent buffers (RoPE frequencies), e.g. after building on the meta device."""
        self.model.make_rotary(self.config, device)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache=None,
        start_pos: int = 0,
        segment_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        return_aux_loss: bool = False,
        return_hidden: bool = False,
    ):
        """input_ids [B, T] -> logits [B, T, V] (the last `logits_to_keep` positions when > 0).

        attention_mask [B, S]: 1 for real tokens, 0 for padding, over every key position (with a
        cache S = start_pos + T). kv_cache/start_pos: the new tokens' keys/values go to slots
        [start_pos, start_pos + T). segment_ids [B, T]: packed documents attend only within their own
        segment (positions restart at each). attn_mask [B, 1, T, S] bool overrides all masking; key j
        must sit at position j (a static cache, a paged cache's gathered blocks), as sliding-window
        layers further drop the keys outside their window of each query's position. Where keys are
        not at their positions (rows packed side by side), pass a dict {window: mask} with one mask
        per layer window (`per_window_masks`) instead.
        """
        c, m = self.config, self.model
        x = m.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        S = start_pos + T if kv_cache is not None else T
        if position_ids is None:
            position_ids = default_positions(B, T, start_pos, segment_ids, x.device)
        rope = rope_local = None
        if c.position == "learned":
            x = x + m.embed_positions(position_ids)
        else:
            rope = m.rotary(position_ids, x.dtype)
            if hasattr(m, "rotary_local"):
                rope_local = m.rotary_local(position_ids, x.dtype)
        # One (mask, is_causal) per distinct attention window among the layers.
        windows = {block.window for block in m.layers}
        if isinstance(attn_mask, dict):
            masks = {w: (attn_mask[w], False) for w in windows}
        elif attn_mask is not None:  # keys at their positions: a sliding layer also drops keys out of its window
            k = torch.arange(attn_mask.shape[-1], device=x.device)
            masks = {
                w: (m, False) for w, m in per_window_masks(c, attn_mask, position_ids[:, None, :, None], k).items()
            }
        else:
            masks = {w: build_mask(c, B, T, S, start_pos, attention_mask, segment_ids, x.device, w) for w in windows}

        router_logits = []
        for block in m.layers:
            mask, is_causal = masks[block.window]
            args = (x, rope_local if block.local_rope else rope, mask, kv_cache, start_pos, is_causal)
            if m.gradient_checkpointing and self.training:
                x, r = checkpoint(block, *args, use_reentrant=False)
            else:
                x, r = block(*args)
            if r is not None:
                router_logits.append(r)
        hidden = m.norm(x)
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        if c.final_logit_softcapping is not None:  # Gemma 2: logits -> cap * tanh(logits / cap)
            logits = c.final_logit_softcapping * torch.tanh(logits / c.final_logit_softcapping)
        if not (return_aux_loss or return_hidden):
            return logits
        out = (logits,)
        if return_aux_loss:
            aux = (
                load_balancing_loss(router_logits, c.num_experts, c.num_experts_per_tok)
                if router_logits
                else logits.new_zeros(())
            )
            out += (aux,)
        if return_hidden:
            out += (hidden,)
        return out


def default_positions(B: int, T: int, start_pos: int, segment_ids: torch.Tensor | None, device) -> torch.Tensor:
    """Positions start_pos..start_pos+T-1, or restarting at 0 at each new segment for packed docs."""
    pos = torch.arange(start_pos, start_pos + T, device=device).expand(B, T)
    if segment_ids is None:
        return pos
    new_segment = torch.ones_like(segment_ids, dtype=torch.bool)
    new_segment[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    idx = torch.arange(T, device=device).expand(B, T)
    segment_start = torch.where(new_segment, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - segment_start


def per_window_masks(c: ModelConfig, allowed: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> dict:
    """{window: mask} for each distinct attention window of the layers (None: global attention):
    `allowed` [..., T, S] further limited, for a sliding layer, to keys with q_pos - k_pos < window
    (q_pos, k_pos: the positions of the queries and keys, broadcasting to allowed's shape)."""
    windows = {c.layer_window(i) for i in range(c.num_hidden_layers)}
    return {w: allowed if w is None else allowed & ((q_pos - k_pos) < w) for w in windows}


def build_mask(
    c: ModelConfig, B: int, T: int, S: int, start_pos: int, attention_mask, segment_ids, device, window="config"
):
    """Boolean attention mask [B|1, 1, T, S] (True = may attend), or None with an is_causal flag when
    SDPA's built-in causal path (or no mask at all) is exact, which is the fast common case.
    `window`: the layer's sliding window (None: none; default: the config's `sliding_window`)."""
    window = c.sliding_window if window == "config" else window
    window = window if window and S > window else None
    if attention_mask is None and segment_ids is None and window is None:
        if not c.causal or T == 1:
            return None, False  # every query sees every key
        if T == S:
            return None, True
    q = torch.arange(start_pos, start_pos + T, device=device)[:, None]
    k = torch.arange(S, device=device)[None, :]
    allowed = torch.ones(T, S, dtype=torch.bool, device=device)
    if c.causal:
        allowed &= k <= q
    if window is not None:
        allowed &= (q - k) < window
    allowed = allowed[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :S].to(torch.bool)
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    # A padding query would otherwise see no key at all (NaN softmax); let it see itself.
    return allowed | (k == q)[None, None], False
