"""Layer-by-layer calibration. The decoder blocks (`model.model.layers[i]`) run one at a time on
the captured inputs; block i+1 sees the outputs of the already-quantized block i (errors do not
compound unseen), and only one block's activations are alive, so peak memory is about the model
plus [samples, T, hidden] activations: a model that fits for inference can be quantized."""

from __future__ import annotations

import resource
from collections.abc import Callable, Sequence

import torch
from torch import nn

from lmforge.common import LmforgeError

BlockInputs = list[tuple[tuple, dict]]  # per calibration batch: (positional args, keyword args)


class _Stop(Exception):
    pass


def check_calibration(
    batches: Sequence[torch.Tensor] | None, min_tokens: int, source: str = "calibration data"
) -> None:
    n = sum(int(b.numel()) for b in batches or [])
    if n < min_tokens:
        raise LmforgeError(
            f"{source}: {n} calibration tokens, need at least {min_tokens} "
            "(pass more text, more/longer samples, or lower --min-calib-tokens)"
        )


@torch.no_grad()
def first_block_inputs(model: nn.Module, batches: Sequence[torch.Tensor]) -> BlockInputs:
    """Run the model up to block 0 only (embeddings, positions, mask) and keep block 0's arguments."""
    captured: BlockInputs = []

    def grab(_module, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(ids)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs) -> BlockInputs:
    """Block outputs, as the next block's inputs (the block returns x or (x, extras))."""
    out = []
    for args, kwargs in inputs:
        y = block(*args, **kwargs)
        out.append(((y[0] if isinstance(y, tuple) else y,) + tuple(args[1:]), kwargs))
    return out


@torch.no_grad()
def observe(
    block: nn.Module, inputs: BlockInputs, names: list[str], on_input: Callable[[str, torch.Tensor], None]
) -> None:
    """Run the block once with hooks that hand every named submodule's input [tokens, K] to on_input."""
    handles = [
        block.get_submodule(n).register_forward_hook(
            lambda _m, args, _out, n=n: on_input(n, args[0].detach().reshape(-1, args[0].shape[-1]))
        )
        for n in names
    ]
    try:
        run_block(block, inputs)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def capture(block: nn.Module, inputs: BlockInputs, names: list[str]) -> dict[str, BlockInputs]:
    """The (args, kwargs) of every call to each named submodule while the block runs on `inputs`,
    so that submodule can be re-run alone (AWQ's scale search)."""
    calls: dict[str, BlockInputs] = {n: [] for n in names}
    handles = [
        block.get_submodule(n).register_forward_pre_hook(
            lambda _m, args, kwargs, n=n: calls[n].append((args, kwargs)), with_kwargs=True
        )
        for n in dict.fromkeys(names)
    ]
    try:
        run_block(block, inputs)
    finally:
        for h in handles:
            h.remove()
    return calls


def reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS counter (Linux: clear_refs 5), so the next reading covers
    only what follows; elsewhere a no-op and the reading covers the whole process life."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """Peak resident memory of this process since the last reset (VmHWM), else since start."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux KiB, macOS bytes: an estimate


@torch.no_grad()
def calibrate_blocks(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    linear_names: list[str],
    quantize_block: Callable[[nn.Module, BlockInputs, list[str]], None],
    progress: bool = True,
) -> dict:
    """For each block: quantize_block(block, its inputs, its linear names relative to the block),
    then feed the quantized block's outputs onward. Returns {'peak_rss_bytes', 'activation_bytes'}."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    inputs = first_block_inputs(model, batches)
    act_bytes = sum(a[0].numel() * a[0].element_size() for a, _ in inputs)
    layers = model.model.layers
    for i, block in enumerate(tqdm(layers, desc="calibrate", disable=not progress)):
        prefix = f"model.layers.{i}."
        names = [n[len(prefix) :] for n in linear_names if n.startswith(prefix)]
        if names:
            quantize_block(block, inputs, names)
        inputs = run_block(block, inputs)
    model.train(was_training)
    return {"peak_rss_bytes": peak_rss_bytes(), "activation_bytes": act_bytes}
