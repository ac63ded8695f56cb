"""Weights moved to huge-page memory (`lmforge.infer.hugepages`): same values, same objects, no broken
sharing, and ordinary tensors for saving and copying."""

import copy
import mmap

import pytest
import torch
from torch import nn

from lmforge.infer.hugepages import HUGE_PAGE, move_to_hugepages

needs_thp = pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="no MADV_HUGEPAGE on this platform")


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(512, 64)
        self.up = nn.Linear(64, 512)
        self.down = nn.Linear(512, 64, bias=False)
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 512, bias=False)
        self.head.weight = self.embed.weight  # tied: one Parameter under two names
        self.register_buffer("table", torch.randn(256, 128))
        self.register_buffer("view", self.table[:64])  # shares the table's storage


@needs_thp
def test_weights_move_with_their_values_objects_and_ties():
    torch.manual_seed(0)
    m = Tied()
    ref = {k: v.clone() for k, v in m.state_dict().items()}
    params = {k: v for k, v in m.named_parameters()}
    ptrs = {k: v.data_ptr() for k, v in m.state_dict().items()}
    moved = move_to_hugepages(m, min_bytes=32 << 10)
    # embed (= head) 128 KB, up and down 128 KB each; the table and its view share storage: left alone;
    # biases and the norm are under min_bytes
    assert moved == 3 * 512 * 64 * 4
    state = m.state_dict()
    assert all(torch.equal(state[k], ref[k]) for k in ref)
    assert all(p is params[k] for k, p in m.named_parameters())  # re-pointed in place
    assert m.head.weight is m.embed.weight
    for name in ("embed.weight", "up.weight", "down.weight"):
        assert state[name].data_ptr() != ptrs[name]
    assert m.table.data_ptr() == ptrs["table"] and m.view.data_ptr() == ptrs["view"]
    assert m.up.bias.data_ptr() == ptrs["up.bias"]
    starts = sorted(state[n].data_ptr() for n in ("embed.weight", "up.weight", "down.weight"))
    assert starts[0] % HUGE_PAGE == 0  # the mapping starts on a huge page


@needs_thp
def test_moved_weights_are_ordinary_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 256))
    assert move_to_hugepages(m, min_bytes=1) > 0
    x = torch.randn(3, 256)
    twin = copy.deepcopy(m)
    assert twin[0].weight.data_ptr() != m[0].weight.data_ptr() and torch.equal(twin(x), m(x))
    save_file(dict(m.state_dict()), str(tmp_path / "w.safetensors"))  # no shared-memory refusal
    loaded = load_file(str(tmp_path / "w.safetensors"))
    assert all(torch.equal(loaded[k], v) for k, v in m.state_dict().items())
    m[0].weight.data.mul_(2)  # still writable, the neighbour untouched
    assert torch.equal(m[1].weight, twin[1].weight)


def test_nothing_to_move():
    assert move_to_hugepages(nn.Linear(4, 4)) == 0
