"""The decoding fast paths equal the plain ones: oneDNN's inner product and split matrix-vector
products against `torch.nn.functional.linear`, and greedy decoding with and without them token
for token."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F

from llmlab import matvec
from llmlab.config import preset
from llmlab.model import GPT, Dropout, KVCache
from llmlab.sampling import SamplingConfig, generate_ids
from tests.conftest import torch_threads


@pytest.fixture
def two_threads():
    with torch_threads(2):
        yield


@pytest.mark.parametrize("parts", [2, 3, 4])
@pytest.mark.parametrize(("N", "bias"), [(1000, True), (1200, False), (1001, False), (7, True)])
def test_split_matvec_equals_f_linear(parts, N, bias):
    """Reference: F.linear on the same x, W, b (one input row or a few, any leading shape), N not
    divisible by parts too."""
    g = torch.Generator().manual_seed(N + parts)
    W = torch.randn(N, 96, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    for shape in [(96,), (1, 96), (1, 1, 96), (2, 96), (1, 5, 96), (3, 2, 96)]:
        x = torch.randn(*shape, generator=g)
        got = matvec.split_matvec(x, W, b, parts)
        torch.testing.assert_close(got, F.linear(x, W, b), rtol=1e-5, atol=1e-5)
        assert got.shape == (*shape[:-1], N)


@pytest.mark.skipif(not matvec.ONEDNN, reason="this PyTorch has no oneDNN")
@pytest.mark.parametrize(("N", "bias"), [(1000, True), (1001, False), (7, True)])
def test_onednn_linear_equals_f_linear(N, bias):
    """Reference: F.linear on the same x, W, b, for every leading shape a few rows come in, and a
    strided x."""
    g = torch.Generator().manual_seed(N)
    W = torch.randn(N, 96, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    shapes = [(96,), (1, 96), (1, 1, 96), (2, 96), (1, 5, 96), (3, 2, 96)]
    for x in [torch.randn(*shape, generator=g) for shape in shapes] + [torch.randn(3, 192, generator=g)[:, ::2]]:
        got = matvec.onednn_linear(x, W, b)
        torch.testing.assert_close(got, F.linear(x, W, b), rtol=1e-5, atol=1e-5)
        assert got.shape == (*x.shape[:-1], N)
    if bias:  # a strided bias (oneDNN itself would read it as dense: 4.4 off before `contiguous`)
        b2 = torch.randn(N, 2, generator=g)[:, 0]
        x = torch.randn(1, 1, 96, generator=g)
        torch.testing.assert_close(matvec.onednn_linear(x, W, b2), F.linear(x, W, b2), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not matvec.ONEDNN, reason="this PyTorch has no oneDNN")
def test_onednn_is_skipped_when_switched_off(monkeypatch):
    W, x = torch.randn(1024, 256), torch.randn(1, 256)
    monkeypatch.setattr(matvec, "MKL_MV", False)
    with torch.no_grad():
        assert matvec.few_row_product(x, W) == "onednn"
        with torch.backends.mkldnn.flags(enabled=False):
            assert matvec.few_row_product(x, W) != "onednn"


@pytest.fixture(params=["onednn", "split"])
def product(request, monkeypatch):
    """Each fast product in turn: oneDNN's where this PyTorch has it, and the split without it."""
    if request.param == "onednn" and not matvec.ONEDNN:
        pytest.skip("this PyTorch has no oneDNN")
    monkeypatch.setattr(matvec, "ONEDNN", request.param == "onednn")
    monkeypatch.setattr(matvec, "MKL_MV", False)  # one row too: not left to MKL, as on Intel CPUs
    calls = []
    real = getattr(matvec, f"{request.param}_linear" if request.param == "onednn" else "split_matvec")
    monkeypatch.setattr(matvec, real.__name__, lambda *a: calls.append(a[0].shape) or real(*a))
    return request.param, calls


def test_linear_takes_a_fast_product_only_for_a_few_rows_of_a_large_weight(monkeypatch, two_threads, product):
    name, calls = product
    monkeypatch.setattr(matvec, "MIN_ELEMENTS", 64 * 64)
    big, small = matvec.Linear(64, 64), matvec.Linear(64, 63)  # 4096 and 4032 elements
    x = torch.randn(1, 1, 64)
    few = torch.randn(2, matvec.FEW_ROWS // 2, 64)
    with torch.no_grad():
        torch.testing.assert_close(big(x), F.linear(x, big.weight, big.bias), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(big(few), F.linear(few, big.weight, big.bias), rtol=1e-5, atol=1e-5)
        small(x), big(torch.randn(1, matvec.FEW_ROWS + 1, 64)), big(torch.randn(0, 64))  # too small; too many; none
        big.double()(x.double())  # fp64: the split, never oneDNN's fp32 primitive
        big.float()
    assert calls == [(1, 1, 64), few.shape] + ([(1, 1, 64)] if name == "split" else [])
    calls.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = big(x)  # autocast: F.linear, which casts to bf16 as autocast does
    assert y.dtype == torch.bfloat16 and calls == []
    big(x).sum().backward()  # a gradient is taken: the plain path, so autograd sees every product
    torch.testing.assert_close(big.weight.grad, x.reshape(1, 64).expand(64, 64))  # d(Σ x·Wᵀ)/dW = 1·x
    big.requires_grad_(False)
    xg = x.clone().requires_grad_()
    big(xg).sum().backward()  # frozen weights, a gradient for the input: plain path too
    torch.testing.assert_close(xg.grad, big.weight.sum(0).reshape(1, 1, 64))  # d(Σ x·Wᵀ)/dx = Σ_rows W
    assert calls == []
    torch.set_num_threads(1)
    with torch.no_grad():
        big(x), big(few)
    assert calls == ([] if name == "split" else [(1, 1, 64), few.shape])  # one thread: nothing to split over


@pytest.mark.skipif(not matvec.ONEDNN, reason="this PyTorch has no oneDNN")
def test_mkl_takes_one_fp32_row_on_intel_cpus(monkeypatch, two_threads):
    """`MKL_MV` (Intel CPUs): one fp32 row goes to F.linear, a few rows and other dtypes as elsewhere.
    References: the same dispatch with `MKL_MV` off, and the float64 product x·Wᵀ + b for the output
    of one row and of a few, either way."""
    lin = matvec.Linear(256, 1024)
    one, few = torch.randn(1, 1, 256), torch.randn(1, 5, 256)
    for mkl, expected in [(True, [None, "onednn", "split"]), (False, ["onednn", "onednn", "split"])]:
        monkeypatch.setattr(matvec, "MKL_MV", mkl)
        with torch.no_grad():
            got = [matvec.few_row_product(x, w) for x, w in [(one, lin.weight), (few, lin.weight),
                                                               (one.double(), lin.weight.double())]]  # fmt: skip
            assert got == expected
            for x in (one, few):
                exact = x.double() @ lin.weight.double().T + lin.bias.double()  # [1, S, 1024]
                torch.testing.assert_close(lin(x), exact.float(), rtol=1e-5, atol=1e-5)


def test_torch_func_transforms_take_the_plain_path(monkeypatch, two_threads):
    """vmap and jvp cannot follow the split's `out=` products. Reference: nn.Linear's own
    vmap (the product of each row) and jvp (the product with the tangent, W·ẋ)."""
    monkeypatch.setattr(matvec, "MIN_ELEMENTS", 64 * 64)
    monkeypatch.setattr(matvec, "MKL_MV", False)  # one fp32 row: not left to MKL, as on Intel CPUs
    lin = matvec.Linear(64, 67).requires_grad_(False)  # 67 rows: the general split, with out=
    xs, dx = torch.randn(3, 1, 64), torch.randn(1, 64)
    torch.testing.assert_close(torch.func.vmap(lin)(xs), F.linear(xs, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
    y, dy = torch.func.jvp(lin, (xs[0],), (dx,))
    torch.testing.assert_close(dy, dx @ lin.weight.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, F.linear(xs[0], lin.weight, lin.bias), rtol=1e-5, atol=1e-5)


def test_forward_mode_dual_tensors_take_the_plain_path(monkeypatch, two_threads):
    """`torch.autograd.forward_ad` tangents do not follow `out=` either (NotImplementedError before).
    Reference: the tangent of x·Wᵀ + b is ẋ·Wᵀ; the primal is F.linear's."""
    monkeypatch.setattr(matvec, "MIN_ELEMENTS", 64 * 64)
    monkeypatch.setattr(matvec, "MKL_MV", False)  # one fp32 row: not left to MKL, as on Intel CPUs
    lin = matvec.Linear(64, 67).requires_grad_(False)  # 67 rows: the general split, with out=
    x, dx = torch.randn(1, 64), torch.randn(1, 64)
    with torch.no_grad(), forward_ad.dual_level():
        assert not matvec.no_dual_level()
        y, dy = forward_ad.unpack_dual(lin(forward_ad.make_dual(x, dx)))
    torch.testing.assert_close(dy, dx @ lin.weight.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
    assert matvec.no_dual_level()  # closed again: decoding splits as before
    with torch.no_grad():
        assert matvec.few_row_product(x, lin.weight, lin.bias) is not None


def test_greedy_decoding_is_the_same_with_and_without_the_fast_products(monkeypatch, two_threads, product):
    """GPT-2 layout, every Linear on a fast product (MIN_ELEMENTS lowered): the same tokens as plain F.linear."""
    _, calls = product
    cfg = replace(preset("gpt2").model, vocab_size=301, n_layers=2, d_model=64, n_heads=4, block_size=64)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    idx = torch.randint(0, 301, (1, 5), generator=torch.Generator().manual_seed(1))

    def decode() -> list[int]:
        return [int(t) for t, _ in generate_ids(model, idx, 40, SamplingConfig(0.0))]

    monkeypatch.setattr(matvec, "MIN_ELEMENTS", 1)
    fast = decode()
    assert len(calls) == 40 * (4 * cfg.n_layers + 1)  # qkv, out, w1, w2, head: the 5-row prompt, then each step
    monkeypatch.setattr(matvec, "MIN_ELEMENTS", 1 << 62)
    assert decode() == fast


def test_dropout_is_the_identity_only_when_it_should_be():
    d = Dropout(0.5)
    x = torch.ones(1000)
    assert d.eval()(x) is x
    assert Dropout(0.0).train()(x) is x
    y = d.train()(x)
    assert 0.3 < (y == 0).float().mean().item() < 0.7 and torch.allclose(y[y != 0], torch.tensor(2.0))


# --- 16-bit weights -----------------------------------------------------------------------------

ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}  # the spacing of 16-bit numbers in [1, 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mv", [True, False])
def test_matvec16_is_the_fp32_product_of_the_rounded_operands(monkeypatch, dtype, bias, mv):
    """Reference: F.linear in fp32 on x and W rounded to 16 bits, its result rounded to 16 bits
    (what a 16-bit kernel accumulating in fp32 returns), then + b in fp32; bf16 through torch.mv
    (Intel CPUs) and F.linear (the others) alike."""
    monkeypatch.setattr(matvec, "BF16_MV", mv)
    g = torch.Generator().manual_seed(3)
    W, x = torch.randn(300, 96, generator=g), torch.randn(1, 1, 96, generator=g)
    b = torch.randn(300, generator=g) if bias else None
    got = matvec.matvec16(x, W.to(dtype), b)
    ref = F.linear(x.to(dtype).float(), W.to(dtype).float()).to(dtype).float()
    ref = ref + b if bias else ref
    assert got.dtype == torch.float32 and got.shape == (1, 1, 300)
    torch.testing.assert_close(got, ref, rtol=ULP[dtype], atol=1e-6)  # at most one 16-bit rounding step apart
    assert (got - F.linear(x, W, b)).abs().max() > 1e-5  # and it is not the fp32 product


def gpt2_like(vocab: int = 301) -> GPT:
    cfg = replace(preset("gpt2").model, vocab_size=vocab, n_layers=2, d_model=64, n_heads=4, block_size=64)
    torch.manual_seed(0)
    return GPT(cfg).eval()


def logits_one_token_at_a_time(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    """ids [1, S] → logits [S, V], each position fed alone through the KV cache, as decoding does."""
    cache = KVCache(model.cfg, 1, ids.device, torch.float32, max_len=ids.shape[1])
    return torch.cat([model(ids[:, i : i + 1], cache=cache)[0] for i in range(ids.shape[1])])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_weights_in_changes_only_one_row_products_of_large_weights(monkeypatch, dtype):
    """Reference: the same model in fp32 (the parameters, untouched). Inside the block, one-token
    steps agree with fp32 to 16-bit rounding and pick the same top token; a prompt of several rows
    is computed in fp32 exactly; on exit nothing of the copies is left."""
    model = gpt2_like()
    monkeypatch.setattr(matvec, "MIN_ELEMENTS", 64 * 64)  # qkv, out, w1, w2 and the head; not ln or biases
    params = {n: (p.data_ptr(), p.dtype) for n, p in model.named_parameters()}
    ids = torch.randint(0, 301, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        steps32, prompt32 = logits_one_token_at_a_time(model, ids), model(ids)
        with matvec.weights_in(model, dtype):
            large = [m for m in model.modules() if isinstance(m, matvec.Linear) and m.weight_copy is not None]
            assert len(large) == 4 * 2 + 1 and all(m.weight_copy.dtype == dtype for m in large)
            steps16, prompt16 = logits_one_token_at_a_time(model, ids), model(ids)
    assert torch.equal(prompt16, prompt32)  # several rows: the fp32 parameters
    assert not torch.equal(steps16, steps32)  # one row: the 16-bit copies
    scale = steps32.abs().max().item()  # within two 16-bit rounding steps of the largest logit (0.3 measured)
    torch.testing.assert_close(steps16, steps32, rtol=0, atol=2 * ULP[dtype] * scale)
    assert torch.equal(steps16.argmax(-1), steps32.argmax(-1))
    assert {n: (p.data_ptr(), p.dtype) for n, p in model.named_parameters()} == params
    assert all("weight_copy" not in m.__dict__ for m in model.modules())


def test_weights_in_nests_shares_tied_copies_and_keeps_gradients_exact(monkeypatch):
    """Reference: the fp32 parameters' own gradient, and the copies made by an enclosing block."""
    model = gpt2_like()
    monkeypatch.setattr(matvec, "MIN_ELEMENTS", 64 * 64)
    linears = [m for m in model.modules() if isinstance(m, matvec.Linear) and m.weight.numel() >= 64 * 64]
    with matvec.weights_in(model, torch.bfloat16):
        outer = [m.weight_copy for m in linears]
        with matvec.weights_in(model, torch.float16):
            assert all(m.weight_copy.dtype == torch.float16 for m in linears)
        assert all(m.weight_copy is c for m, c in zip(linears, outer, strict=True))  # the outer block's copies are back
        x = torch.randn(1, 1, 64, requires_grad=True)
        w1 = model.blocks[0].mlp.w1
        w1(x).sum().backward()  # a gradient is taken: the fp32 parameter, not the copy
        torch.testing.assert_close(x.grad, w1.weight.sum(0).reshape(1, 1, 64))
    assert all("weight_copy" not in m.__dict__ for m in model.modules())
    twins = [matvec.Linear(64, 64), matvec.Linear(64, 64)]
    twins[1].weight = twins[0].weight  # two Linears, one weight: one copy
    with matvec.weights_in(torch.nn.Sequential(*twins), torch.float16):
        assert twins[0].weight_copy is twins[1].weight_copy


def test_weights_in_leaves_small_weights_and_rejects_other_dtypes():
    model = gpt2_like()  # every weight below the real MIN_ELEMENTS
    with matvec.weights_in(model, torch.float16):
        assert all(m.weight_copy is None for m in model.modules() if isinstance(m, matvec.Linear))
    dtypes = "torch.float16, torch.bfloat16 or torch.float32"
    with pytest.raises(ValueError, match=dtypes), matvec.weights_in(model, torch.int8):
        pass


def test_packed_weights_need_onednn_and_a_fp32_model_on_the_cpu(monkeypatch):
    monkeypatch.setattr(matvec, "MIN_ELEMENTS", 64 * 64)
    monkeypatch.setattr(matvec, "ONEDNN", True)  # the model is refused before anything is packed
    model = gpt2_like().double()
    with pytest.raises(ValueError, match="for a model in fp32 on the CPU"), matvec.weights_in(model, torch.float32):
        pass
    assert all("weight_copy" not in m.__dict__ for m in model.modules())
    monkeypatch.setattr(matvec, "ONEDNN", False)
    with (
        pytest.raises(ValueError, match="need PyTorch built with oneDNN"),
        matvec.weights_in(gpt2_like(), torch.float32),
    ):
        pass


@pytest.mark.skipif(not matvec.ONEDNN, reason="this PyTorch has no oneDNN")
def test_packed_fp32_weights_decode_as_the_parameters_do(monkeypatch):
    """Reference: the same model through F.linear on its parameters (`ONEDNN` off, one thread: no
    fast product at all). Packed copies change the layout, not the numbers: one-token steps agree to
    fp32 rounding and greedy decoding gives the same tokens; a prompt of several rows and any
    gradient use the parameters; on exit nothing of the copies is left."""
    model = gpt2_like()
    monkeypatch.setattr(matvec, "MIN_ELEMENTS", 64 * 64)
    ids = torch.randint(0, 301, (1, 24), generator=torch.Generator().manual_seed(2))
    idx = ids[:, :5]

    def decode() -> list[int]:
        return [int(t) for t, _ in generate_ids(model, idx, 40, SamplingConfig(0.0))]

    with torch_threads(1), pytest.MonkeyPatch.context() as plain:
        plain.setattr(matvec, "ONEDNN", False)
        with torch.no_grad():
            steps, prompt = logits_one_token_at_a_time(model, ids), model(ids)
        tokens = decode()
    calls = []
    real = matvec.onednn_linear
    monkeypatch.setattr(matvec, "onednn_linear", lambda *a: calls.append(a[1].is_mkldnn) or real(*a))
    with matvec.weights_in(model, torch.float32):
        large = [m for m in model.modules() if isinstance(m, matvec.Linear) and m.weight_copy is not None]
        assert len(large) == 4 * 2 + 1 and all(m.weight_copy.is_mkldnn for m in large)
        with torch.no_grad():
            packed_steps = logits_one_token_at_a_time(model, ids)
            assert calls == [True] * (24 * len(large))  # every one-row product read a packed copy
            torch.testing.assert_close(model(ids), prompt, rtol=1e-5, atol=1e-5)  # several rows: the parameters
        assert decode() == tokens
        x = torch.randn(1, 1, 64, requires_grad=True)
        w1 = model.blocks[0].mlp.w1
        w1(x).sum().backward()  # a gradient is taken: the fp32 parameter, not the copy
        torch.testing.assert_close(x.grad, w1.weight.sum(0).reshape(1, 1, 64))
    torch.testing.assert_close(packed_steps, steps, rtol=1e-5, atol=1e-5)
    assert all("weight_copy" not in m.__dict__ for m in model.modules())


@pytest.mark.skipif(not matvec.ONEDNN, reason="this PyTorch has no oneDNN")
def test_packed_copies_step_aside_for_what_they_were_not_packed_for(monkeypatch):
    """Forward-mode AD (jvp, dual tensors) and a model cast to fp64 inside the block take the
    plain product on the parameters. Reference: the tangent of x·Wᵀ + b is ẋ·Wᵀ; F.linear in fp64."""
    monkeypatch.setattr(matvec, "MIN_ELEMENTS", 64 * 64)
    lin = matvec.Linear(64, 128).requires_grad_(False)
    x, dx = torch.randn(1, 1, 64), torch.randn(1, 1, 64)
    with matvec.weights_in(lin, torch.float32):
        assert lin.weight_copy.is_mkldnn
        y, dy = torch.func.jvp(lin, (x,), (dx,))
        torch.testing.assert_close(dy, dx @ lin.weight.T, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y, F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
        with torch.no_grad(), forward_ad.dual_level():
            _, tangent = forward_ad.unpack_dual(lin(forward_ad.make_dual(x, dx)))
        torch.testing.assert_close(tangent, dx @ lin.weight.T, rtol=1e-5, atol=1e-5)
        lin.double()
        with torch.no_grad():
            torch.testing.assert_close(lin(x.double()), F.linear(x.double(), lin.weight, lin.bias))


def test_parametrized_weights_get_a_copy_each(monkeypatch):
    """A parametrized weight is a new tensor at each access: its id may be reused by the next
    one's. Reference: each module's own weight, rounded to fp16 (the modules' weights differ 1-4×)."""

    class Scale(torch.nn.Module):
        def __init__(self, k: float) -> None:
            super().__init__()
            self.k = k

        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w * self.k

    monkeypatch.setattr(matvec, "MIN_ELEMENTS", 64 * 64)
    torch.manual_seed(0)
    mods = [matvec.Linear(64, 64, bias=False) for _ in range(4)]
    for k, m in enumerate(mods, 1):
        torch.nn.utils.parametrize.register_parametrization(m, "weight", Scale(float(k)))
    x = torch.randn(1, 64)
    with torch.no_grad(), matvec.weights_in(torch.nn.Sequential(*mods), torch.float16):
        for m in mods:
            torch.testing.assert_close(m(x), matvec.matvec16(x, m.weight.half(), None))  # this module's own weight


@pytest.mark.skipif(not matvec.ONEDNN, reason="this PyTorch has no oneDNN")
def test_torch_compile_takes_the_plain_path(monkeypatch, two_threads):
    """Under `torch.compile` one row goes to `F.linear`, which Inductor lowers itself: oneDNN's
    inner product called on a weight that is not a frozen constant failed in Inductor (torch
    2.13, GPT-2 124M's first one-row product). Reference: F.linear in eager mode."""
    monkeypatch.setattr(matvec, "MKL_MV", False)  # one fp32 row: oneDNN's product, as on AMD CPUs
    lin = matvec.Linear(512, matvec.MIN_ELEMENTS // 512)  # just large enough for the fast product
    x = torch.randn(1, 1, 512)
    with torch.no_grad():
        assert matvec.few_row_product(x, lin.weight, lin.bias) == "onednn"  # eager: the fast product
        y = torch.compile(lin)(x)  # as users compile: graph breaks allowed (with fullgraph=True the
        # old code failed earlier, in dynamo, on the private op's non-tensor arguments)
    torch.testing.assert_close(y, F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
