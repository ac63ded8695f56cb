"""The C CPU kernels (lmforge.quant.cpu_kernel), the Q8_0/Q4_0 formats and the fused batch-1 decode step:
every C path (AVX-512 VNNI, AVX2, scalar) equals the torch reference, the torch fallback (no compiler)
computes the same, quantized blocks are ggml's bytes, and decoding through the C step gives the torch
path's greedy tokens and logits."""

import copy

import pytest
import torch

from lmforge.infer import fused_block
from lmforge.infer.generate import generate
from lmforge.infer.prepare import prepare_for_inference
from lmforge.model import ModelConfig, Transformer
from lmforge.model.config import PRESETS
from lmforge.model.kv_cache import KVCache
from lmforge.quant import Q4_0Linear, Q8_0Linear, cpu_kernel, parse_scheme, quant_config, swap
from lmforge.quant.kernel_linear import act_dequantize, q4_0_quantize, q8_0_quantize
from lmforge.quant.scheme import make_quant_linear

PATHS = ("native", "avx2", "scalar")
needs_kernel = pytest.mark.skipif(not cpu_kernel.available(), reason="no C compiler: the torch paths are tested")


def random_model(preset: str = "tiny", **overrides) -> Transformer:
    """Weights at a scale where logits differ (the 0.02 init makes every logit ~0 and greedy ties)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_dict({**PRESETS[preset], **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.dim() == 1 else 0.0))
    return model


def reference(q, x: torch.Tensor) -> torch.Tensor:
    """The formats' arithmetic in plain torch: int8-rounded activations times the dequantized weight."""
    return torch.nn.functional.linear(act_dequantize(x), q.dequantize(), q.bias)


@pytest.mark.parametrize("cls", [Q8_0Linear, Q4_0Linear])
def test_blocks_are_ggml_reference_bytes(cls):
    gguf = pytest.importorskip("gguf")
    torch.manual_seed(0)
    w = torch.randn(16, 256) * torch.rand(16, 1)
    w[3, :32] = 0  # an all-zero block: scale 0
    qt = gguf.GGMLQuantizationType.Q8_0 if cls is Q8_0Linear else gguf.GGMLQuantizationType.Q4_0
    blocks = gguf.quants.quantize(w.numpy(), qt).reshape(16, 8, -1)
    scales = torch.from_numpy(blocks[:, :, :2].copy().view("float16").squeeze(-1))
    if cls is Q8_0Linear:
        q, d = q8_0_quantize(w, 256)
        assert torch.equal(q, torch.from_numpy(blocks[:, :, 2:].copy().view("int8")).reshape(16, 256))
    else:
        q, d = q4_0_quantize(w, 256)
        qs = torch.from_numpy(blocks[:, :, 2:].copy())  # ggml: low nibbles values 0-15, high 16-31
        assert torch.equal(q, torch.cat([qs & 15, qs >> 4], -1).reshape(16, 256))
    assert torch.equal(d, scales)


@needs_kernel
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cls", [Q8_0Linear, Q4_0Linear])
@pytest.mark.parametrize("shape", [(1, 768, 96), (3, 176, 40), (2, 100, 7)])  # (rows, in, out): padded widths too
def test_kernel_equals_torch_reference(cls, path, shape):
    m, k, n = shape
    torch.manual_seed(1)
    q = cls.from_float(torch.nn.Linear(k, n))
    q.kernel = path
    x = torch.randn(m, k) * 3
    with torch.no_grad():
        y = q(x)
    assert cpu_kernel.kernel_path(cpu_kernel.library(path)) in ("avx512-vnni", "avx2", "scalar")
    torch.testing.assert_close(y, reference(q, x), rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rows, n", [(1, 70), (2, 70), (5, 200), (4, 131)])  # several rows: the register tiles
def test_f32_gemv_both_layouts(path, rows, n):
    lib = cpu_kernel.library(path)
    torch.manual_seed(2)
    w, x = torch.randn(n, 45), torch.randn(rows, 45)
    torch.testing.assert_close(cpu_kernel.f32_linear(x, w, False, lib), x @ w.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cpu_kernel.f32_linear(x, w.t().contiguous(), True, lib), x @ w.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [Q8_0Linear, Q4_0Linear])
def test_torch_fallback_computes_the_same_and_passes_gradients(cls, monkeypatch):
    torch.manual_seed(3)
    q = cls.from_float(torch.nn.Linear(64, 24))
    x = torch.randn(2, 64)
    with torch.no_grad():
        fast = q(x)
    monkeypatch.setattr(cpu_kernel, "library", lambda path="native", extra="": None)  # as without a compiler
    with torch.no_grad():
        slow = q(x)
    torch.testing.assert_close(slow, fast, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(slow, reference(q, x), rtol=1e-6, atol=1e-6)
    x.requires_grad_(True)
    q(x).sum().backward()  # straight-through: the gradient of x @ W^T
    torch.testing.assert_close(x.grad, q.dequantize().sum(0).expand(2, -1), rtol=1e-5, atol=1e-5)


def test_schemes_round_trip_through_a_quant_config():
    model = random_model()
    assert parse_scheme("Q4_0") == {"format": "q4_0"}
    swap(model, "q4_0", skip=("embed",))
    config = quant_config(model)
    assert {spec["format"] for spec in config["modules"].values()} == {"q4_0"}
    for name, spec in config["modules"].items():
        m = model.get_submodule(name)
        empty = make_quant_linear(torch.nn.Linear(m.in_features, m.out_features, bias=False, device="meta"), spec)
        assert {k: v.shape for k, v in empty.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}


class Spy:
    """Counts the whole-step C calls of a library."""

    def __init__(self, lib):
        self.lib, self.steps, self.calls = lib, 0, []

    def __getattr__(self, name):
        return getattr(self.lib, name)

    def llama_forward(self, *args):
        self.steps += 1
        self.calls.append((args[5], args[2]))  # (layers, rows)
        return self.lib.llama_forward(*args)

    def llama_propose(self, *args):
        self.calls.append(("propose", args[4]))  # (greedy drafting, layers)
        return self.lib.llama_propose(*args)


def decode_logits(model, ids: list[int], steps: int) -> torch.Tensor:
    cache = KVCache.for_model(model, 1, len(ids) + steps)
    out = []
    with torch.inference_mode():
        logits = model(torch.tensor([ids]), kv_cache=cache, logits_to_keep=1)[:, -1]
        for i in range(steps):
            token = logits.argmax(-1, keepdim=True)
            logits = model(token, kv_cache=cache, start_pos=len(ids) + i, logits_to_keep=1)[:, -1]
            out.append(logits)
    return torch.cat(out)


@needs_kernel
@pytest.mark.parametrize("scheme", [None, "q8_0", "q4_0"])
@pytest.mark.parametrize("overrides", [{}, {"attention_bias": True, "tie_word_embeddings": False}])
def test_fused_decode_matches_the_torch_path(scheme, overrides, monkeypatch):
    base = random_model(**overrides)
    if scheme:
        swap(base, scheme, skip=("embed",))
    spy = Spy(fused_block.block_library())
    monkeypatch.setattr(cpu_kernel, "library", lambda path="native", extra="": spy)
    fast = prepare_for_inference(copy.deepcopy(base))
    assert all(hasattr(b, "_lmforge_layer_spec") for b in fast.model.layers)
    ids = torch.randint(0, base.config.vocab_size, (1, 10)).tolist()[0]
    torch.testing.assert_close(decode_logits(fast, ids, 12), decode_logits(base, ids, 12), rtol=1e-4, atol=1e-4)
    before = spy.steps
    assert torch.equal(generate(fast, [ids], max_new_tokens=24), generate(base, [ids], max_new_tokens=24))
    assert spy.steps - before == 24  # the prompt and every decode step after it went through the one C call


@needs_kernel
@pytest.mark.parametrize("scheme", [None, "q8_0"])
def test_fused_rows_match_the_torch_path(scheme, monkeypatch):
    """Several tokens in one C call (a speculative verification, a prefill chunk): every row's logits
    equal torch's, each row attending only up to its own slot; explicit positions and logits_to_keep too."""
    base = random_model(attention_bias=True, tie_word_embeddings=False)
    if scheme:
        swap(base, scheme, skip=("embed",))
    spy = Spy(fused_block.block_library())
    monkeypatch.setattr(cpu_kernel, "library", lambda path="native", extra="": spy)
    fast = prepare_for_inference(copy.deepcopy(base))
    ids = torch.randint(0, base.config.vocab_size, (1, 77))
    with torch.inference_mode():
        caches = [KVCache.for_model(m, 1, 96) for m in (fast, base)]
        # a prefill of 71 rows: in chunks of 64 + 7 (fp32 matrices: torch's path past 16 rows)
        first = [m(ids[:, :71], kv_cache=c, logits_to_keep=1) for m, c in zip((fast, base), caches)]
        torch.testing.assert_close(first[0], first[1], rtol=1e-4, atol=1e-4)
        rows = [m(ids[:, 71:75], kv_cache=c, start_pos=71) for m, c in zip((fast, base), caches)]  # 4 rows
        torch.testing.assert_close(rows[0], rows[1], rtol=1e-4, atol=1e-4)
        assert rows[0].shape == (1, 4, base.config.vocab_size)
        positions = torch.tensor([[75, 76]])
        last = [
            m(ids[:, 75:], kv_cache=c, start_pos=75, position_ids=positions, logits_to_keep=1)
            for m, c in zip((fast, base), caches)
        ]
        torch.testing.assert_close(last[0], last[1], rtol=1e-4, atol=1e-4)
        assert last[0].shape == (1, 1, base.config.vocab_size)
        for kf, kb in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):  # all 77 slots written
            torch.testing.assert_close(kf[:, :, :77], kb[:, :, :77], rtol=1e-4, atol=1e-4)
    layers = base.config.num_hidden_layers
    assert spy.calls == ([(layers, 64), (layers, 7)] if scheme else []) + [(layers, 4), (layers, 2)]


@needs_kernel
@pytest.mark.parametrize("path", ["avx2", "scalar"])
def test_fused_decode_on_the_narrower_paths(path):
    base = random_model("tiny", num_key_value_heads=1)
    swap(base, "q4_0", skip=("embed", "down_proj"))  # mixed: fp32 and Q4_0 matrices in one block
    fast = copy.deepcopy(base).eval()
    assert fused_block.fuse_blocks(fast, kernel=path) == base.config.num_hidden_layers
    ids = list(range(1, 9))
    torch.testing.assert_close(decode_logits(fast, ids, 6), decode_logits(base, ids, 6), rtol=1e-4, atol=1e-4)


def test_unsupported_blocks_and_missing_kernels_keep_the_torch_path(monkeypatch):
    qk = random_model("tiny", qk_norm="head")  # Qwen3-style q/k norms: not what the C block computes
    assert fused_block.fuse_blocks(copy.deepcopy(qk)) == 0
    plain = random_model()
    monkeypatch.setattr(cpu_kernel, "library", lambda path="native", extra="": None)
    prepared = prepare_for_inference(copy.deepcopy(plain))
    assert not any(hasattr(b, "_lmforge_layer_spec") for b in prepared.model.layers)
    ids = [[3, 4, 5, 6]]
    assert torch.equal(generate(prepared, ids, max_new_tokens=8), generate(plain, ids, max_new_tokens=8))


@needs_kernel
def test_blocks_alone_take_the_c_path_when_the_head_does_not_qualify():
    base = random_model("tiny", tie_word_embeddings=False)
    swap(base, "q8_0", skip=("embed", "lm_head"))
    swap(base, "int8", skip=("embed", "layers"))  # an int8 head: no C step for the whole model
    fast = prepare_for_inference(copy.deepcopy(base))
    assert not hasattr(fast, "_lmforge_step_spec")
    assert all(hasattr(b, "_lmforge_layer_spec") for b in fast.model.layers)
    ids = list(range(2, 12))
    torch.testing.assert_close(decode_logits(fast, ids, 8), decode_logits(base, ids, 8), rtol=1e-4, atol=1e-4)
    assert torch.equal(generate(fast, [ids], max_new_tokens=16), generate(base, [ids], max_new_tokens=16))


@needs_kernel
@pytest.mark.parametrize("draft_scheme", [None, "q8_0"])
def test_speculative_verification_and_a_subvocab_draft_run_in_c(draft_scheme, monkeypatch):
    """A prepared target verifies k + 1 tokens in one C call, the prepared draft with a sub-vocabulary head
    proposes through its own one-call step, and greedy output equals plain greedy."""
    from lmforge.infer.sampling import SamplingParams
    from lmforge.infer.speculative import DraftProposer, speculative_generate

    spy = Spy(fused_block.block_library())
    monkeypatch.setattr(cpu_kernel, "library", lambda path="native", extra="": spy)
    target = random_model(num_hidden_layers=3, tie_word_embeddings=False)
    draft = copy.deepcopy(target)
    draft.model.layers = draft.model.layers[:1]
    draft.config.num_hidden_layers = 1
    if draft_scheme:  # a quantized draft, head included: its sub-vocabulary head keeps the blocks
        swap(draft, draft_scheme, skip=("embed",))
    prompt = torch.randint(0, target.config.vocab_size, (9,)).tolist()
    reference = generate(target, [prompt], max_new_tokens=20)[0].tolist()
    subset = sorted(set(reference) | set(range(40)))
    fast, fast_draft = prepare_for_inference(copy.deepcopy(target)), prepare_for_inference(draft)
    for confidence in (0.0, 0.3):
        proposer = DraftProposer(fast_draft, 64, confidence, vocab=subset)
        out, stats = speculative_generate(fast, prompt, SamplingParams(max_new_tokens=20), proposer, k=3)
        assert out == reference and stats.steps < 20
        assert (3, 4) in spy.calls  # a verification of 3 drafts + the last token: the target's 3 layers, 4 rows
        assert ("propose", 1) in spy.calls  # the draft's greedy proposals: one C call per step
        # The same proposals as the draft's Python loop (one forward per token): the same statistics.
        del proposer.draft._lmforge_propose
        slow = speculative_generate(fast, prompt, SamplingParams(max_new_tokens=20), proposer, k=3)[1]
        assert slow.accepted_per_step == stats.accepted_per_step and slow.proposed == stats.proposed


def test_team_size_keeps_the_faster_thread_count():
    """One busy core makes a 2-thread team slower than one thread: the probe finds it, and finds 2 again
    once the other program is gone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        team = fused_block.TeamSize()

        def run(calls: int, seconds: dict[int, float]) -> list[int]:
            used = []
            for _ in range(calls):
                n = team()
                used.append(n)
                team.record(n, seconds[n])
            return used

        first = run(team.CYCLE, {2: 1.0, 1: 3.0})  # quiet: 2 threads win; 1 is only probed
        assert first.count(1) == team.PROBE and first[-1] == 2
        busy = run(team.CYCLE, {2: 5.0, 1: 1.5})  # beside a busy loop: 1 thread from the probe on
        assert busy[2 * team.PROBE :] == [1] * (team.CYCLE - 2 * team.PROBE)
        quiet = run(team.CYCLE, {2: 1.0, 1: 1.5})
        assert quiet[-1] == 2
        torch.set_num_threads(1)
        assert team() == 1
    finally:
        torch.set_num_threads(threads)


@needs_kernel
@pytest.mark.parametrize("path", PATHS)
def test_the_c_swiglu_gate_equals_torch(path):
    """silu(g) * u in the C step (16 lanes through a polynomial exp on AVX-512) against torch, from far
    negative (e^-g overflows) to far positive gates."""
    import ctypes

    lib = fused_block.block_library(path)
    g = torch.cat(
        [torch.linspace(-120, 120, 2001), torch.randn(1000) * 4, torch.tensor([0.0, -0.0, 1e-30, -88.0, 89.0])]
    )
    u = torch.randn_like(g)
    out = g.clone()
    lib.swiglu.restype = None
    lib.swiglu(ctypes.c_void_p(out.data_ptr()), ctypes.c_void_p(u.data_ptr()), ctypes.c_int64(g.numel()))
    torch.testing.assert_close(out, torch.nn.functional.silu(g) * u, rtol=2e-6, atol=1e-30)
