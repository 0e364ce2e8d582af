"""The per-step fast paths are exact: each gives bit for bit what the code it replaces gives (that code
is the oracle), so no committed training result moves."""

import pytest
import torch
from torch import nn

from kronsparse import kernels
from kronsparse.functional import soft_threshold
from kronsparse.layers import KronLinear
from kronsparse.methods import steering
from kronsparse.methods.kron import KronMethod, KronOptions


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits (so -0.0 differs from 0.0 and a NaN's payload counts)."""
    return t.contiguous().view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("grid", [(3, 5, 2, 2), (4, 3, 1, 1), (2, 6, 3, 4), (5, 2, 2, 1), (5, 4, 1, 2)])  # (m1, n1, bo, bi)
@pytest.mark.parametrize("to_blocks", [True, False])
def test_word_reorder_moves_the_same_bits_as_the_strided_copy(dtype, grid, to_blocks):
    m1, n1, bo, bi = grid
    t = torch.randn(m1 * n1 * bo * bi, dtype=torch.float64).to(dtype)
    t[::7] = -0.0
    word = kernels._word_dtype(t, bi)
    if bi * t.element_size() > 8:
        assert word is None  # no integer that wide: the other paths
        return
    assert torch.equal(bits(kernels._word_transpose(t, grid, to_blocks, word)),
                       bits(kernels._strided_reorder(t, grid, to_blocks)))


def test_word_reorder_refuses_what_it_cannot_view():
    t = torch.randn(41)
    assert kernels._word_dtype(t[1:], 2) is None  # a run of 2 floats would start off an 8-byte boundary
    assert kernels._word_dtype(t[:40].view(4, 10).t(), 2) is None  # not contiguous
    assert kernels._word_dtype(torch.randn(8, dtype=torch.complex64), 1) is None


@pytest.mark.parametrize("to_blocks", [True, False])
def test_word_reorder_gradient(to_blocks):
    grid = (3, 4, 2, 1)  # bi = 1 in float64: one int64 word per element
    t = torch.randn(24, dtype=torch.float64, requires_grad=True)
    word = kernels._word_dtype(t, 1)
    assert torch.autograd.gradcheck(lambda x: kernels._WordReorder.apply(x, grid, to_blocks, word), (t,))


# --------------------------------------------------------------------------------------------
# The kron method's step: foreach over layers, scores built only when used
# --------------------------------------------------------------------------------------------


class PerLayerKron(KronMethod):
    """The oracle: the kron method's scale pin and prox as they were, one layer at a time, every
    score built every step (methods/kron.py before the foreach version)."""

    @torch.no_grad()
    def _pin_scale(self) -> None:
        if self.pin != "norm":
            return
        for layer in self.layers:
            n = layer.A.square().sum(0).sqrt_().clamp_min_(torch.finfo(layer.A.dtype).tiny)
            layer.A.div_(n)
            layer.S.mul_(n)

    def _prox(self, steps: list, step: int) -> None:
        if self.steering is not None:
            self.steering.track(step, [layer.S.abs() * m for layer, m in zip(self.layers, self.masks)], steps)
        new = [soft_threshold(layer.S.mul_(m), s * lam)
               for layer, m, s, lam in zip(self.layers, self.masks, steps, self.lams)]
        if self.steering is not None:
            zero = [n == 0 for n in new]
            self.steering.update(step, [int(z.sum()) for z in zero])
            keep = self.steering.keep_excess(step, zero, [layer.S.abs() for layer in self.layers])
            if keep is not None:
                new = [torch.where(k, layer.S, n) for k, layer, n in zip(keep, self.layers, new)]
            drop = self.steering.floor(step, [n != 0 for n in new], [n.abs() for n in new])
            if drop is not None:
                new = [n.masked_fill(d, 0.0) for n, d in zip(new, drop)]
        for k, (layer, n) in enumerate(zip(self.layers, new)):
            layer.S.copy_(n)
            self.masks[k] = n != 0
        self._mask_grads()


def train_kron(method_cls, steps: int, **options):
    """A 3-layer Kron MLP on random data, every step's S, A, masks and lambdas recorded."""
    torch.manual_seed(0)
    model = nn.Sequential(KronLinear(24, 16, (2, 2), 2), nn.ReLU(), KronLinear(16, 12, (2, 4), 2), nn.ReLU(),
                          KronLinear(12, 4, (1, 3), 1))
    method = method_cls(KronOptions(**options), steps)
    method.prepare(model, {n: m for n, m in model.named_modules() if isinstance(m, KronLinear)})
    opt = torch.optim.SGD(method.param_groups(model, lr=0.05), lr=0.05, momentum=0.9)
    x, y = torch.randn(64, 24), torch.randint(0, 4, (64,))
    trace = []
    for step in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.step(opt, step)
        trace.append([bits(t).clone() for layer in method.layers for t in (layer.S, layer.A)]
                     + [m.clone() for m in method.masks] + [torch.tensor(method.lams, dtype=torch.float64)])
    return trace


@pytest.mark.parametrize("options", [
    dict(target_sparsity=0.6, scale_pin="norm"),  # the default steering ("track") and pin of deep models
    dict(target_sparsity=0.6, scale_pin="decay"),
    dict(target_sparsity=0.5, scale_pin="norm", steering="legacy"),
    dict(target_sparsity=0.5, scale_pin="norm", steering="prune"),
    dict(target_sparsity=0.7, scale_pin="norm", scope="global"),
    dict(lam=0.05, scale_pin="norm"),  # a fixed lambda, no target
])
def test_the_kron_step_is_bit_identical_to_the_per_layer_one(options):
    options = dict(block_shape=(2, 2), rank=2, sparsify_fraction=0.8, **options)
    fast, oracle = train_kron(KronMethod, 150, **options), train_kron(PerLayerKron, 150, **options)
    assert len(fast) == len(oracle) == 150
    for step, (a, b) in enumerate(zip(fast, oracle)):
        assert all(torch.equal(u, v) for u, v in zip(a, b)), f"step {step}"
    assert not fast[-1][-2].all()  # it pruned something: the prox, cap and top-up all ran


# --------------------------------------------------------------------------------------------
# W of small blocks without the GEMM
# --------------------------------------------------------------------------------------------


def weight_and_grads(C, B, x, gy):
    C, B, x = (t.detach().requires_grad_() for t in (C, B, x))
    W = kernels._build_weight(C, B)
    y = nn.functional.linear(x, W)
    return [W, y, *torch.autograd.grad(y, (C, B, x), gy)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 150, 392, 2, 2), (2, 6, 5, 2, 2), (1, 4, 3, 1, 1), (2, 3, 8, 2, 1),
                                   (3, 5, 4, 1, 2), (4, 6, 5, 2, 2), (1, 7, 3, 2, 2)])  # (r, m1, n1, bo, bi)
def test_small_blocks_give_the_gemm_paths_bits(shape, dtype, monkeypatch):
    """W, the layer's output and the gradients of C = S*A, B and x, bit for bit, with and without the GEMM."""
    monkeypatch.setattr(kernels, "_PRODUCT_SUM_MIN", 0)  # small shapes too: quick to check
    r, m1, n1, bo, bi = shape
    g = torch.Generator().manual_seed(1)
    C, B = torch.randn(r, m1, n1, generator=g, dtype=dtype), torch.randn(r, bo, bi, generator=g, dtype=dtype)
    C[:, ::2, 1::3] = 0.0  # pruned blocks
    C[:, 1::2, ::3] = -0.0
    x, gy = torch.randn(7, n1 * bi, generator=g, dtype=dtype), torch.randn(7, m1 * bo, generator=g, dtype=dtype)
    kernels._product_sum_agrees.cache_clear()
    fast = weight_and_grads(C, B, x, gy)
    if (dtype, shape) == (torch.float32, (2, 150, 392, 2, 2)):
        assert kernels._product_sum_start(C, B) is not None  # the case this is for did skip the GEMM
    monkeypatch.setattr(kernels, "_PRODUCT_SUM", False)
    gemm = weight_and_grads(C, B, x, gy)
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(fast, gemm))


def test_the_word_reordering_in_a_layer_gives_the_strided_copys_bits(monkeypatch):
    """W of the MLP's first layer at 2x2 (235,200 entries: the word path) and every gradient, bit for bit."""
    monkeypatch.setattr(kernels, "_PRODUCT_SUM", False)
    g = torch.Generator().manual_seed(2)
    C, B = torch.randn(2, 150, 392, generator=g), torch.randn(2, 2, 2, generator=g)
    x, gy = torch.randn(5, 784, generator=g), torch.randn(5, 300, generator=g)
    words = weight_and_grads(C, B, x, gy)
    monkeypatch.setattr(kernels, "_WORD_REORDER", False)
    strided = weight_and_grads(C, B, x, gy)
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(words, strided))


def test_small_blocks_skip_the_gemm_where_used():
    """The MLP's 784->300 layer at 2x2, rank 2 (the benchmark's case) is built without the GEMM."""
    C, B = torch.randn(2, 150, 392), torch.randn(2, 2, 2)
    assert kernels._product_sum_start(C, B) is not None
    assert kernels._product_sum_start(C, torch.randn(2, 2, 16)) is None  # wide blocks: the GEMM
    assert kernels._product_sum_start(C[:, :10], B) is None  # few entries: the GEMM (less Python)


def test_a_product_sum_that_differs_from_the_gemm_is_not_used(monkeypatch):
    monkeypatch.setattr(kernels, "_PRODUCT_SUM_MIN", 0)
    original = kernels._product_sum
    monkeypatch.setattr(kernels, "_product_sum", lambda C, B, zero_start: torch.nextafter(
        original(C, B, zero_start), torch.tensor(float("inf"))))  # one ulp off
    kernels._product_sum_agrees.cache_clear()
    C, B = torch.randn(2, 6, 5), torch.randn(2, 2, 2)
    assert kernels._product_sum_start(C, B) is None
    M = torch.mm(C.reshape(2, 30).t(), B.reshape(2, 4))
    assert torch.equal(kernels._build_weight(C, B), kernels._strided_reorder(M, (6, 5, 2, 2), False).view(12, 10))
    kernels._product_sum_agrees.cache_clear()


def test_small_blocks_gradcheck(monkeypatch):
    monkeypatch.setattr(kernels, "_PRODUCT_SUM_MIN", 0)
    C = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    B = torch.randn(2, 2, 2, dtype=torch.float64, requires_grad=True)
    assert kernels._product_sum_start(C, B) is not None
    assert torch.autograd.gradcheck(kernels._build_weight, (C, B))


# --------------------------------------------------------------------------------------------
# The "track" steering's order statistic
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kth_smallest_is_torch_kthvalue(dtype):
    """Against torch.kthvalue (what the steering called before), on scores as the steering sees them:
    many exact zeros (pruned blocks), ties, an inf and a NaN, every k of a small set and spread k of a large one."""
    g = torch.Generator().manual_seed(3)
    small = torch.tensor([0.5, 0.0, 0.25, 0.5, float("inf"), 0.0, float("nan"), 1e-30, 3.0], dtype=dtype)
    large = torch.rand(58800, generator=g, dtype=torch.float64).to(dtype) / 10
    large[torch.rand(58800, generator=g) < 0.4] = 0.0
    large[::97] = torch.round(large[::97] * 100) / 100  # ties
    for values, ks in ((small, range(1, 10)), (large, [1, 2, 23520, 23521, 23522, 30000, 58799, 58800])):
        for k in ks:
            expected = torch.kthvalue(values.float(), k).values
            got = steering.kth_smallest(values, k)
            assert (got != got and expected != expected) or got == float(expected), k


def topk_select(scores, k, largest):
    """The oracle: steering.select as it was, torch.topk over all scores."""
    flat = torch.cat([s.flatten() for s in scores])
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        chosen[torch.topk(flat, k, largest=largest).indices] = True
    return [part.view_as(s) for part, s in zip(chosen.split([s.numel() for s in scores]), scores)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("largest", [True, False])
def test_select_picks_what_topk_picks(dtype, largest):
    """The cap's and the top-up's choice: every k, on scores with the -1 / inf of the entries that may
    not be picked, exact zeros, ties inside and across the k-th (where by value cannot decide it
    defers to topk) and one NaN."""
    g = torch.Generator().manual_seed(4)
    a = torch.rand(150, 392, generator=g, dtype=torch.float64).to(dtype)
    a[torch.rand(150, 392, generator=g) < 0.5] = -1.0 if largest else float("inf")
    b = torch.round(torch.rand(50, 150, generator=g, dtype=torch.float64) * 20).to(dtype) / 20  # many ties
    c = torch.tensor([[0.0, 0.0, 0.3], [0.3, float("nan"), 1.0]], dtype=dtype)
    decided = 0
    for scores in ([a], [a, b], [b], [c]):
        n = sum(s.numel() for s in scores)
        for k in sorted({k for k in (0, 1, 2, 5, 777, n // 3, n // 2, n - 1, n) if k <= n}):
            got, expected = steering.select(scores, k, largest), topk_select(scores, k, largest)
            assert all(torch.equal(u, v) for u, v in zip(got, expected)), (len(scores), k)
            decided += k > 0 and steering.by_value(torch.cat([s.flatten() for s in scores]), k, largest) is not None
    assert decided > 5  # the fast path did decide most of them


def test_the_fast_paths_step_aside_under_torch_compile():
    """Traced tensors have no data pointer (the word view) and the product sum's one-time check runs
    tensors: under torch.compile the layer takes the GEMM and the gather, in one graph."""
    layer = KronLinear(784, 300, (2, 2), 2, path="materialize")
    x = torch.randn(4, 784)
    y = layer(x)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), y)


def test_double_backward_through_the_fast_paths(monkeypatch):
    """A gradient penalty (create_graph) differentiates the word reordering and the product sum again."""
    monkeypatch.setattr(kernels, "_GATHER_MAX", 0)
    monkeypatch.setattr(kernels, "_PRODUCT_SUM_MIN", 0)
    C = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    B = torch.randn(2, 2, 1, dtype=torch.float64, requires_grad=True)  # bi = 1 in float64: int64 words
    assert kernels._product_sum_start(C, B) is not None
    assert torch.autograd.gradgradcheck(kernels._build_weight, (C, B))
    t = torch.randn(24, dtype=torch.float64, requires_grad=True)
    word = kernels._word_dtype(t, 1)
    assert torch.autograd.gradgradcheck(lambda x: kernels._WordReorder.apply(x, (3, 4, 2, 1), True, word), (t,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("filler", [-1.0, 0.0, 2.5])
def test_where_filled_is_torch_where_to_the_bit(dtype, filler):
    """The cap's scores without torch.where's branches: the same bits as torch.where on scattered masks,
    on negative values and -0.0, and (through the fallback) where an inf or a NaN turns the blend to NaN."""
    g = torch.Generator().manual_seed(5)
    values = torch.randn(150, 392, generator=g, dtype=torch.float64).to(dtype)
    values[0, :3] = torch.tensor([-0.0, 0.0, 1e-30])
    mask = torch.rand(150, 392, generator=g) < 0.53
    odd = values.clone()
    odd[5, 5], odd[7, 7] = float("inf"), float("nan")
    for v in (values, values.abs(), odd):
        for m in (mask, ~mask, torch.zeros_like(mask), torch.ones_like(mask)):
            got, expected = steering.where_filled(m, v, filler), torch.where(m, v, filler)
            bits = torch.int32 if dtype == torch.float32 else torch.int64
            assert torch.equal(got.view(bits), expected.view(bits))
