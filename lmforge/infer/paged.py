"""Paged KV cache: one pool of fixed-size blocks shared by every sequence (vLLM's PagedAttention
layout, gathered rather than fused since this is readable PyTorch).

Each layer's keys/values live in a flat slot pool [num_blocks * block_size, Hkv, hd]; slot
`b * block_size + i` is token i of block b. A sequence owns a block table (list of block ids), so
memory grows a block at a time and nothing is reserved for tokens that never come.

The engine calls `set_step(write_slots, block_table)` before each forward; attention's
`update(layer_idx, k, v, start_pos)` then scatters the new keys to `write_slots` [B, T] and
gathers each row's blocks `block_table` [B, nb] whole (a block is one contiguous chunk, so the
gather is nb memcpys per row, not one per token), giving keys [B, Hkv, nb * block_size, hd];
the engine's mask hides slots past each row's length. Padding points at block 0, which is
reserved as a scratch block and never handed out.

`BlockPool` is the allocator: reference counts (prefix-shared blocks), a hash table of full
blocks for prefix caching, and an LRU of cached blocks nobody uses any more that are evicted
only when the free list is empty.
"""

from __future__ import annotations

from collections import OrderedDict, deque

import torch

from lmforge.model import per_window_masks

PAD_BLOCK = 0  # scratch block: padding tokens write here, padded keys read from here (masked out)


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is scratch), got {num_blocks}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free: deque[int] = deque(range(1, num_blocks))
        self.ref = [0] * num_blocks
        self.by_hash: dict[int, int] = {}  # prefix hash -> block holding those tokens
        self.hash_of: dict[int, int] = {}  # block -> its prefix hash
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks with ref 0, LRU first

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (free or evictable cached)."""
        return len(self.free) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - 1 - self.num_free

    def allocate(self) -> int | None:
        """A block with ref 1, or None when the pool is exhausted."""
        if self.free:
            block = self.free.popleft()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            del self.by_hash[self.hash_of.pop(block)]
        else:
            return None
        self.ref[block] = 1
        return block

    def release(self, block: int) -> None:
        self.ref[block] -= 1
        if self.ref[block] == 0:
            if block in self.hash_of:
                self.evictable[block] = None  # keep its contents for a later prefix hit
            else:
                self.free.append(block)

    def lookup(self, prefix_hash: int) -> int | None:
        """The cached block for this prefix hash (its ref count taken), or None."""
        block = self.by_hash.get(prefix_hash)
        if block is None:
            return None
        if self.ref[block] == 0:
            self.evictable.pop(block, None)
        self.ref[block] += 1
        return block

    def register(self, block: int, prefix_hash: int) -> None:
        """Record that `block` (full) holds the tokens behind `prefix_hash`."""
        if prefix_hash not in self.by_hash and block not in self.hash_of:
            self.by_hash[prefix_hash] = block
            self.hash_of[block] = prefix_hash


def block_hashes(tokens: list[int], block_size: int, salt: object = None) -> list[int]:
    """Chained hash of every full block: block i's hash covers all tokens up to its end (and the
    salt, e.g. the LoRA adapter, since the same tokens give different keys under another adapter)."""
    out, h = [], hash(("lmforge-prefix", salt))
    for i in range(len(tokens) // block_size):
        h = hash((h, tuple(tokens[i * block_size : (i + 1) * block_size])))
        out.append(h)
    return out


class PagedKVCache:
    """Per-layer slot pools plus the per-step slot maps; implements the model's `update` protocol.

    Decoding keeps a gathered copy: when every row of a step decodes one token and the rows are the
    same sequences as in the previous step, each one token further, the rows' keys/values gathered
    last step are still right but for that one token. So instead of gathering every block again
    (a quarter of a 16-row decode step on CPU), the new token is written into the copy, which is
    gathered with a few blocks of headroom and rebuilt only when the batch changes, outgrows it,
    or any other forward (a prefill, a speculative verify) runs. The pool stays the one source of
    truth (swaps, prefix hits read it); the copy is only kept within `mirror_bytes`."""

    MIRROR_HEADROOM = 4  # blocks gathered beyond the longest row: a rebuild every 4 blocks of growth

    def __init__(
        self,
        config,
        num_blocks: int,
        block_size: int = 16,
        device=None,
        dtype=torch.float32,
        mirror_bytes: int = 64 << 20,
    ):
        self.block_size, self.num_blocks = block_size, num_blocks
        shape = (num_blocks * block_size, config.num_key_value_heads, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        # The same memory seen block by block, for the per-step gather (views made once, not per call).
        self.k_blocks = [k.view(num_blocks, block_size, *shape[1:]) for k in self.k]
        self.v_blocks = [v.view(num_blocks, block_size, *shape[1:]) for v in self.v]
        self.write_slots: torch.Tensor | None = None
        self.block_table: torch.Tensor | None = None
        self._blocks: torch.Tensor | None = None
        self.mirror_bytes = mirror_bytes
        self._mirror: list | None = None  # per layer (k, v) [B, capacity, Hkv, hd], or None
        self._mirror_rows: tuple = ()  # ((sequence id, next position), ...) the copy is valid for
        self._append: torch.Tensor | None = None  # this step: where the new tokens go in the copy, flat

    @property
    def bytes_per_block(self) -> int:
        t = self.k[0]
        return 2 * len(self.k) * self.block_size * t.shape[1] * t.shape[2] * t.element_size()

    def set_step(
        self, write_slots: torch.Tensor, block_table: torch.Tensor, decode_rows: list[tuple[int, int]] | None = None
    ) -> int:
        """write_slots [B, T]: where each new token's k/v goes; block_table [B, nb]: each row's blocks;
        decode_rows: (sequence id, position of its one new token) per row when every row decodes,
        which lets the gathered copy be reused. Returns the key length the attention will see."""
        self.write_slots, self.block_table, self._blocks = write_slots.reshape(-1), block_table, block_table.reshape(-1)
        self._append = None
        S = block_table.shape[1] * self.block_size
        B = block_table.shape[0]
        capacity = S + self.MIRROR_HEADROOM * self.block_size
        if decode_rows is None or B * capacity * self.bytes_per_block // self.block_size > self.mirror_bytes:
            self._mirror, self._mirror_rows = None, ()  # keys written now would be missing from the copy
            return S
        rows = tuple(decode_rows)
        if self._mirror is not None and rows == self._mirror_rows and S <= self._mirror[0][0].shape[1]:
            capacity = self._mirror[0][0].shape[1]
            flat = [row * capacity + pos for row, (_, pos) in enumerate(rows)]
            self._append = torch.tensor(flat, device=write_slots.device)
        else:  # (re)build: gather the blocks plus headroom (the scratch block: finite, masked out)
            pad = torch.full((B, self.MIRROR_HEADROOM), PAD_BLOCK, dtype=block_table.dtype, device=block_table.device)
            self._blocks = torch.cat([block_table, pad], 1).reshape(-1)
            self._mirror = [None] * len(self.k)
        self._mirror_rows = tuple((rid, pos + 1) for rid, pos in rows)
        return capacity

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, start_pos: int = 0):
        """k, v [B, Hkv, T, hd] -> every row's keys/values [B, Hkv, S, hd] (S: the key length set_step
        returned; start_pos is implied by the slots)."""
        B, H, T, D = k.shape
        k_new, v_new = k.transpose(1, 2).reshape(B * T, H, D), v.transpose(1, 2).reshape(B * T, H, D)
        self.k[layer_idx].index_copy_(0, self.write_slots, k_new)
        self.v[layer_idx].index_copy_(0, self.write_slots, v_new)
        if self._append is not None:  # the batch's copy from the last step, plus this token
            k_all, v_all = self._mirror[layer_idx]
            k_all.view(-1, H, D).index_copy_(0, self._append, k_new)
            v_all.view(-1, H, D).index_copy_(0, self._append, v_new)
        else:
            S = self._blocks.numel() // B * self.block_size
            k_all = self.k_blocks[layer_idx].index_select(0, self._blocks).view(B, S, H, D)
            v_all = self.v_blocks[layer_idx].index_select(0, self._blocks).view(B, S, H, D)
            if self._mirror is not None:
                self._mirror[layer_idx] = (k_all, v_all)
        return k_all.transpose(1, 2), v_all.transpose(1, 2)

    def _slots(self, blocks: list[int]) -> torch.Tensor:
        b = torch.tensor(blocks, dtype=torch.long, device=self.k[0].device)
        return (b[:, None] * self.block_size + torch.arange(self.block_size, device=b.device)).reshape(-1)

    def read_blocks(self, blocks: list[int], device="cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copy the blocks' contents out (KV offload): per layer (k, v) [n * block_size, Hkv, hd]."""
        slots = self._slots(blocks)
        return [
            (k.index_select(0, slots).to(device), v.index_select(0, slots).to(device)) for k, v in zip(self.k, self.v)
        ]

    def write_blocks(self, blocks: list[int], data: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Inverse of read_blocks (swap back in, possibly to different block ids)."""
        slots = self._slots(blocks)
        for (k, v), (dk, dv) in zip(zip(self.k, self.v), data):
            k.index_copy_(0, slots, dk.to(k.device))
            v.index_copy_(0, slots, dv.to(v.device))


def write_slots(tables: list[list[int]], positions: list[list[int]], block_size: int) -> torch.Tensor:
    """Slot of each (row, position) [B, T]; position -1 means padding (the scratch block)."""
    return torch.tensor(
        [
            [PAD_BLOCK * block_size if p < 0 else t[p // block_size] * block_size + p % block_size for p in pos]
            for t, pos in zip(tables, positions)
        ],
        dtype=torch.long,
    )


def block_table(tables: list[list[int]], num_blocks: int) -> torch.Tensor:
    """[B, num_blocks] block ids, padded with the scratch block."""
    return torch.tensor(
        [t[:num_blocks] + [PAD_BLOCK] * (num_blocks - len(t[:num_blocks])) for t in tables], dtype=torch.long
    )


class CacheGroup:
    """Several paged caches indexed by the same block ids (a target's and its draft's): a sequence's
    blocks hold both models' keys, so they are swapped out and back in together."""

    def __init__(self, *caches: PagedKVCache):
        self.caches = caches

    @property
    def bytes_per_block(self) -> int:
        return sum(c.bytes_per_block for c in self.caches)

    def read_blocks(self, blocks: list[int], device="cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [layer for c in self.caches for layer in c.read_blocks(blocks, device)]

    def write_blocks(self, blocks: list[int], data: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        start = 0
        for c in self.caches:
            c.write_blocks(blocks, data[start : start + len(c.k)])
            start += len(c.k)


# ----------------------------------------------------------------------------- forwards over block tables

Row = tuple[list[int], int, list[int]]  # (new tokens, position of the first one, the sequence's block table)


def forward_padded(
    model, cache: PagedKVCache, rows: list[Row], keep: int = 1, row_ids: list[int] | None = None
) -> torch.Tensor:
    """Rows of new tokens left-padded to the longest, each seeing only its own blocks: logits of
    the last `keep` columns [B, keep, V] (a row's last token is always the last column). row_ids:
    the rows' sequence ids, so that a decode step (one token per row) can reuse the keys the
    cache gathered for the same rows last step."""
    T, bs, device = max(len(t) for t, _, _ in rows), cache.block_size, cache.k[0].device
    ids, write_pos, ctx = [], [], []
    for tokens, start, _ in rows:
        n = len(tokens)
        ids.append([0] * (T - n) + tokens)
        write_pos.append([-1] * (T - n) + list(range(start, start + n)))
        ctx.append(start + n)
    qpos, ctx = torch.tensor(write_pos), torch.tensor(ctx)
    nb = -(-int(ctx.max()) // bs)  # blocks covering the longest context
    tables = [blocks for _, _, blocks in rows]
    # A decode step: (sequence id, position of its new token) per row.
    decode = [(rid, n - 1) for rid, n in zip(row_ids, ctx.tolist())] if row_ids is not None and T == 1 else None
    S = cache.set_step(write_slots(tables, write_pos, bs).to(device), block_table(tables, nb).to(device), decode)
    # Keys sit at their positions (a row's blocks gathered in order): the model applies each layer's window.
    mask = _padded_mask(qpos, ctx, S).to(device)
    logits = model(
        torch.tensor(ids, device=device),
        position_ids=qpos.clamp(min=0).to(device),
        attn_mask=mask,
        kv_cache=cache,
        logits_to_keep=keep,
    )
    return logits.float()


def _padded_mask(qpos: torch.Tensor, ctx: torch.Tensor, S: int) -> torch.Tensor:
    """[B, 1, T, S]: key j is visible to a query at position p if j <= p and j is in the row's context."""
    k = torch.arange(S)[None, None, :]
    q = qpos[:, :, None]
    allowed = (k <= q) & (k < ctx[:, None, None])
    allowed |= (q < 0) & (k == 0)  # padding queries see one key (their output is discarded)
    return allowed[:, None]


def forward_packed(model, cache: PagedKVCache, rows: list[Row]) -> torch.Tensor:
    """Rows packed into one batch row [1, sum n] (no padding): each row's queries see only its own
    blocks (a block-diagonal causal mask over the concatenated block tables). Logits of every
    row's last token [B, V]."""
    bs, device = cache.block_size, cache.k[0].device
    ids, qpos, tables, owner, key_pos, last, slots = [], [], [], [], [], [], []
    for i, (tokens, start, blocks) in enumerate(rows):
        positions = list(range(start, start + len(tokens)))
        ids += tokens
        qpos += positions
        owner += [i] * len(tokens)
        last.append(len(ids) - 1)
        nb = -(-(start + len(tokens)) // bs)
        tables += blocks[:nb]
        key_pos.append(torch.arange(nb * bs))
        slots.append(write_slots([blocks], [positions], bs)[0])
    key_owner = torch.cat([torch.full((len(k),), i) for i, k in enumerate(key_pos)])
    q, k = torch.tensor(qpos)[:, None], torch.cat(key_pos)[None, :]
    allowed = (torch.tensor(owner)[:, None] == key_owner[None, :]) & (k <= q)
    # Keys of several rows side by side are not at their positions: one mask per layer window.
    masks = {w: m[None, None].to(device) for w, m in per_window_masks(model.config, allowed, q, k).items()}
    cache.set_step(torch.cat(slots).reshape(1, -1).to(device), torch.tensor([tables], device=device))
    _, hidden = model(
        torch.tensor([ids], device=device),
        position_ids=torch.tensor([qpos], device=device),
        attn_mask=masks,
        kv_cache=cache,
        logits_to_keep=1,
        return_hidden=True,
    )
    return model.lm_head(hidden[0, last]).float()
