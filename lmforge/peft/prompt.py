"""Soft prompts: prompt tuning and P-tuning v1 (virtual input tokens), prefix tuning and P-tuning
v2 (virtual keys/values at every layer).

Virtual input tokens (`model.peft_prompt`, a `PromptSlot`) are added by forward hooks on the
Transformer, so the model keeps its class and its call signature:
  - the first call (no cache, or a cache with start_pos == 0) embeds input_ids, prepends the P
    virtual embeddings through `inputs_embeds`, prepends P ones to `attention_mask` and shifts
    given `position_ids` by P; the returned logits (and hidden states) have the P virtual positions
    cut off, so they are [B, T, V] as without the prompt and labels need no change;
  - decode calls with a cache (start_pos > 0) get start_pos + P and P leading ones on the mask:
    the virtual tokens are already in the cache. Allocate caches `virtual_tokens(model)` longer.

Virtual keys/values (`model.peft_prefix`, a `PrefixSlot`) use the attention's `kv_prefix` slot:
each layer's attention gets a parameter-free `PrefixView` that returns that layer's
(k, v) [B, n_kv_heads, P, head_dim]; attention concatenates them in front of the (cached) keys and
lets every query see them. The KV cache never holds the prefix, so cache sizes are unchanged.
Prefix keys are used as is (no RoPE), as in peft.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.common import LmforgeError

from .config import PrefixConfig, PromptTuningConfig, PTuningConfig
from .layers import NamedAdapters


class _Foldable(nn.Module):
    """A generator of virtual tensors whose output can be frozen into a plain tensor (`merge`)."""

    def __init__(self):
        super().__init__()
        self.folded: torch.Tensor | None = None

    def compute(self) -> torch.Tensor:
        raise NotImplementedError

    def value(self) -> torch.Tensor:
        return self.folded if self.folded is not None else self.compute()

    @torch.no_grad()
    def merge(self) -> None:
        self.folded = self.compute().detach()

    def unmerge(self) -> None:
        self.folded = None


class PromptEmbedding(_Foldable):
    """P virtual token embeddings [P, H]: direct (prompt tuning) or through an encoder (P-tuning)."""

    def __init__(self, config: PromptTuningConfig | PTuningConfig, embed: nn.Embedding):
        super().__init__()
        P, H = config.num_virtual_tokens, embed.embedding_dim
        w = embed.weight
        kw = {"device": w.device, "dtype": w.dtype}
        self.encoder = None
        if isinstance(config, PromptTuningConfig) and config.init != "random":
            ids = (
                torch.randint(0, embed.num_embeddings, (P,))
                if config.init == "vocab"
                else torch.tensor(config.init_token_ids).repeat(P // len(config.init_token_ids) + 1)[:P]
            )
            if int(ids.max()) >= embed.num_embeddings:
                raise LmforgeError(
                    f"PromptTuningConfig.init_token_ids: id {int(ids.max())} >= vocab size {embed.num_embeddings}"
                )
            self.embedding = nn.Parameter(w.detach()[ids.to(w.device)].clone())
        else:
            std = 0.02 if w.is_meta else w.detach().float().std().item()  # the vocabulary's scale
            self.embedding = nn.Parameter(torch.randn(P, H, **kw) * std)
        if isinstance(config, PTuningConfig):
            E = config.encoder_hidden_size
            if config.encoder == "lstm":  # bidirectional LSTM then an MLP, as in P-tuning v1
                self.lstm = nn.LSTM(H, E, num_layers=2, bidirectional=True, batch_first=True, **kw)
                self.encoder = nn.Sequential(nn.Linear(2 * E, E, **kw), nn.ReLU(), nn.Linear(E, H, **kw))
            else:
                self.lstm = None
                self.encoder = nn.Sequential(nn.Linear(H, E, **kw), nn.ReLU(), nn.Linear(E, H, **kw))

    def compute(self) -> torch.Tensor:
        if self.encoder is None:
            return self.embedding
        h = self.embedding[None]
        if self.lstm is not None:
            h = self.lstm(h)[0]
        return self.encoder(h)[0]


class PrefixEncoder(_Foldable):
    """Per-layer key/value prefixes, [L, 2, n_kv, P, head_dim] once reshaped.

    projection=True (prefix tuning): P embeddings [P, H] -> Linear(H, E) -> tanh -> Linear(E, L*2*kv)
    (Li & Liang 2021 found the direct parameterisation unstable). projection=False (P-tuning v2):
    the prefix tensor [P, L*2*kv] is the parameter."""

    def __init__(self, config: PrefixConfig, n_layers: int, n_kv: int, head_dim: int, hidden: int, ref: torch.Tensor):
        super().__init__()
        kw = {"device": ref.device, "dtype": ref.dtype}
        self.shape = (n_layers, 2, n_kv, head_dim)
        P, out = config.num_virtual_tokens, n_layers * 2 * n_kv * head_dim
        if config.projection:
            self.embedding = nn.Parameter(torch.randn(P, hidden, **kw))
            self.mlp = nn.Sequential(
                nn.Linear(hidden, config.encoder_hidden_size, **kw),
                nn.Tanh(),
                nn.Linear(config.encoder_hidden_size, out, **kw),
            )
        else:
            self.embedding = nn.Parameter(torch.randn(P, out, **kw) * 0.02)
            self.mlp = None

    def compute(self) -> torch.Tensor:
        flat = self.embedding if self.mlp is None else self.mlp(self.embedding)  # [P, L*2*kv*hd]
        L, two, n_kv, hd = self.shape
        return flat.view(-1, L, two, n_kv, hd).permute(1, 2, 3, 0, 4)  # [L, 2, n_kv, P, hd]


class _Slot(NamedAdapters):
    """Named soft-prompt adapters of one kind; the active ones are concatenated."""

    def merge(self) -> None:
        for name in self.active:
            self[name].merge()

    def unmerge(self) -> None:
        for module in self.values():
            module.unmerge()

    def num_tokens(self) -> int:
        return sum(self[n].value().shape[-2] for n in self.active)


class PromptSlot(_Slot):
    def embeddings(self) -> torch.Tensor:
        return torch.cat([self[n].value() for n in self.active], dim=0)  # [P, H]


class PrefixSlot(_Slot):
    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.active:  # all prefixes switched off: an empty prefix (P = 0)
            enc = next(iter(self.values()))
            _, _, n_kv, hd = enc.shape
            empty = enc.embedding.new_zeros(n_kv, 0, hd)
            return empty, empty
        kv = torch.cat([self[n].value()[layer] for n in self.active], dim=-2)  # [2, n_kv, P, hd]
        return kv[0], kv[1]


class PrefixView(nn.Module):
    """What one attention layer sees in its `kv_prefix` slot. Holds the shared PrefixSlot in a
    list so its parameters are not registered a second time under every layer."""

    def __init__(self, slot: PrefixSlot, layer: int):
        super().__init__()
        self._slot = [slot]
        self.layer = layer

    def forward(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self._slot[0].layer_kv(self.layer)
        return k.expand(batch_size, *k.shape), v.expand(batch_size, *v.shape)


def _prompt_pre_hook(model: nn.Module, args: tuple, kwargs: dict):
    slot: PromptSlot = model.peft_prompt
    slot.strip = 0
    if not slot.active:
        return None
    P = slot.num_tokens()
    if kwargs.get("attn_mask") is not None or kwargs.get("segment_ids") is not None:
        raise LmforgeError("prompt tuning does not support attn_mask/segment_ids (packed batches); pad instead")
    mask, pos = kwargs.get("attention_mask"), kwargs.get("position_ids")
    input_ids = args[0] if args else kwargs.get("input_ids")
    embeds = kwargs.get("inputs_embeds")
    ref = embeds if embeds is not None else input_ids
    B, dev = ref.shape[0], ref.device
    if mask is not None:
        kwargs["attention_mask"] = torch.cat([mask.new_ones(B, P), mask], dim=1)
    if pos is not None:
        pos = pos + P
    cache, T = kwargs.get("kv_cache"), ref.shape[1]
    room = getattr(cache, "max_len", None)
    if room is not None and kwargs.get("start_pos", 0) + P + T > room:
        raise LmforgeError(
            f"KV cache of {room} slots is too short: prompt tuning adds {P} virtual tokens; "
            "allocate peft.virtual_tokens(model) more slots"
        )
    if cache is not None and kwargs.get("start_pos", 0) > 0:  # decode: the prompt is already cached
        kwargs["start_pos"] = kwargs["start_pos"] + P
        kwargs["position_ids"] = pos
        return args, kwargs
    if embeds is None:
        embeds = model.model.embed_tokens(input_ids)
    virtual = slot.embeddings().to(embeds.dtype).expand(B, -1, -1)
    kwargs["inputs_embeds"] = torch.cat([virtual, embeds], dim=1)
    kwargs["input_ids"] = None
    if pos is not None:
        kwargs["position_ids"] = torch.cat([torch.arange(P, device=dev).expand(B, P), pos], dim=1)
    slot.strip = P
    return (), kwargs


def _prompt_post_hook(model: nn.Module, args: tuple, kwargs: dict, out):
    P = model.peft_prompt.strip
    if not P:
        return None
    keep = kwargs.get("logits_to_keep", 0)

    def cut(t: torch.Tensor, is_logits: bool) -> torch.Tensor:
        return t if (is_logits and keep) or t.dim() < 3 else t[:, P:]

    if isinstance(out, tuple):
        return tuple(cut(t, i == 0) for i, t in enumerate(out))
    return cut(out, True)


def add_prompt(model: nn.Module, config: PromptTuningConfig | PTuningConfig) -> None:
    if not hasattr(model, "peft_prompt"):
        model.peft_prompt = PromptSlot()
        model.register_forward_pre_hook(_prompt_pre_hook, with_kwargs=True)
        model.register_forward_hook(_prompt_post_hook, with_kwargs=True)
    model.peft_prompt[config.adapter_name] = PromptEmbedding(config, model.model.embed_tokens)
    model.peft_prompt.active = [config.adapter_name]


def add_prefix(model: nn.Module, config: PrefixConfig) -> None:
    c = model.config
    attns = [layer.self_attn for layer in model.model.layers]
    if not all(hasattr(a, "kv_prefix") for a in attns):
        raise LmforgeError("this model's attention has no kv_prefix slot; prefix tuning needs it")
    if not hasattr(model, "peft_prefix"):
        model.peft_prefix = PrefixSlot()
        for i, attn in enumerate(attns):
            attn.kv_prefix = PrefixView(model.peft_prefix, i)
    ref = model.model.embed_tokens.weight
    model.peft_prefix[config.adapter_name] = PrefixEncoder(
        config, len(attns), c.num_key_value_heads, c.head_dim, c.hidden_size, ref
    )
    model.peft_prefix.active = [config.adapter_name]


def prompt_modules(model: nn.Module) -> list[_Slot]:
    return [m for m in (getattr(model, "peft_prompt", None), getattr(model, "peft_prefix", None)) if m is not None]


def virtual_tokens(model: nn.Module) -> int:
    """Extra KV-cache slots the active prompt-tuning tokens occupy (prefixes need none)."""
    slot = getattr(model, "peft_prompt", None)
    return slot.num_tokens() if slot is not None and slot.active else 0
