"""Several activation rows through one C call (prefill, speculative verification) give, row for row,
the same bits as one row at a time, on every C path; the AVX-512 kernels take weight rows and
activation rows in tiles of 4, so the shapes here leave remainders of both."""

import pytest
import torch

from lmforge.quant import Q4_0Linear, Q8_0Linear, cpu_kernel

PATHS = ("native", "avx2", "scalar")
needs_kernel = pytest.mark.skipif(not cpu_kernel.available(), reason="no C compiler: the torch paths are tested")


@needs_kernel
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["f32", "q8_0", "q4_0"])
@pytest.mark.parametrize("shape", [(9, 768, 22), (6, 300, 13)])  # (rows, in, out)
def test_a_batch_equals_its_rows_one_at_a_time(kind, path, shape):
    m, k, n = shape
    torch.manual_seed(3)
    lib = cpu_kernel.library(path)
    x = torch.randn(m, k) * 2
    if kind == "f32":
        w = torch.randn(n, k)
        run = lambda rows: cpu_kernel.f32_linear(rows, w, False, lib)  # noqa: E731
        torch.testing.assert_close(run(x), x @ w.t(), rtol=1e-4, atol=1e-4)
    else:
        q = (Q8_0Linear if kind == "q8_0" else Q4_0Linear).from_float(torch.nn.Linear(k, n))
        run = lambda rows: cpu_kernel.quant_linear(rows, q.qweight, q.scales, q.bits, lib)  # noqa: E731
    batch = run(x)
    single = torch.cat([run(x[i : i + 1]) for i in range(m)])
    assert torch.equal(batch, single)
