"""Model weights in transparent huge pages (2 MB), for CPU decode.

Why: at batch 1 a decode step streams every weight from memory once per token. In 4 KB pages the
CPU's hardware prefetchers stop at every page boundary and each page costs a TLB walk; in 2 MB pages
the same C kernels read much faster (measured on a 2-vCPU AMD EPYC, one core, a whole decode step's
matmuls of the 110M Llama: F32 20 -> 32 GB/s, Q8_0 22 -> 29 GB/s, Q4_0 16 -> 19 GB/s). llama.cpp gets
the same from the page cache's large folios of its mmap'd GGUF.

How: one private anonymous mapping advised MADV_HUGEPAGE (honoured under Linux's default THP mode
"madvise"), 2 MB aligned, holding the weights one after the other (most of a small model's matrices
are under 2 MB: a mapping each would not fill its pages), each parameter or buffer re-pointed to its
slice in place (`t.data = ...`), so modules, tied weights and state dicts see the same objects.
Elsewhere (no madvise, THP off) tensors stay where they are; nothing changes but the speed.
"""

from __future__ import annotations

import mmap

import torch
from torch import nn

HUGE_PAGE = 2 << 20
MIN_BYTES = 64 << 10  # norms and biases: not worth a copy
ALIGN = 4096


def _arena(nbytes: int) -> tuple[mmap.mmap, int] | None:
    """A private anonymous mapping of `nbytes` advised for huge pages, and the offset in it that is
    2 MB aligned; None where the platform has no MADV_HUGEPAGE."""
    if not hasattr(mmap, "MADV_HUGEPAGE") or not hasattr(mmap, "MAP_PRIVATE"):
        return None
    buf = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel without THP
        buf.close()
        return None
    base = torch.frombuffer(buf, dtype=torch.uint8, count=1).data_ptr()
    return buf, -base % HUGE_PAGE


def move_to_hugepages(model: nn.Module, min_bytes: int = MIN_BYTES) -> int:
    """Copy `model`'s contiguous CPU parameters and buffers of at least `min_bytes` into one mapping
    advised for huge pages and re-point them there in place; returns the bytes moved. Each tensor keeps
    a storage of its own (a slice of the mapping, which lives while any of them does), so saving,
    safetensors' shared-memory check and deep copies see ordinary tensors. Tensors that share their
    storage with another (views, aliases under another name) are left alone: no sharing is broken."""
    tensors: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for t in (*module._parameters.values(), *module._buffers.values()):
            if t is not None and t.device.type == "cpu":
                tensors[id(t)] = t
    owners: dict[int, int] = {}
    for t in tensors.values():
        key = t.untyped_storage().data_ptr()
        owners[key] = owners.get(key, 0) + 1
    chosen = []
    for t in tensors.values():
        nbytes, storage = t.numel() * t.element_size(), t.untyped_storage()
        if nbytes >= min_bytes and t.is_contiguous() and t.storage_offset() == 0 and storage.nbytes() == nbytes:
            if owners[storage.data_ptr()] == 1:
                chosen.append((t, nbytes))
    offsets, total = [], 0
    for _, nbytes in chosen:
        offsets.append(total)
        total += -(-nbytes // ALIGN) * ALIGN
    arena = _arena(total) if chosen else None
    if arena is None:
        return 0
    buf, start = arena
    for (t, _), off in zip(chosen, offsets):
        new = torch.frombuffer(buf, dtype=t.dtype, count=t.numel(), offset=start + off).view(t.shape)
        new.copy_(t.detach())
        t.data = new
    return sum(nbytes for _, nbytes in chosen)
