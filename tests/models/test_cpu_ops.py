"""The CPU kernels (kernels/cpu_ops.c) against torch on the same inputs: the few-row bfloat16 products are at
least as accurate as torch's GEMM, the fused residual + RMSNorm and rotary give torch's values, and anything
the kernels do not handle falls through to torch unchanged."""

from __future__ import annotations

import pytest
import torch

from tokenmill.models.cpu_ops import MAX_Q8_ROWS, CpuKernelOps, load_ops_kernel
from tokenmill.models.layers import Linear, RotaryEmbedding, TorchOps
from tokenmill.models.packed_linear import PANEL, PackedLinear, pack, pack_model, unpack
from tokenmill.models.quantization import ACTIVATION_BLOCK, block_sums, quantize_int8

TORCH = TorchOps()


@pytest.fixture(scope="module")
def ops() -> CpuKernelOps:
    kernel = load_ops_kernel()
    if kernel is None:
        pytest.skip("no C compiler: the engine runs torch ops")
    return CpuKernelOps(kernel)


@pytest.fixture(scope="module")
def gemm_ops(ops) -> CpuKernelOps:
    if torch.bfloat16 not in ops.gemms:
        pytest.skip("this CPU lacks AVX-512 and AVX2: torch computes every product")
    return ops


@pytest.fixture(scope="module")
def q8_ops(ops) -> CpuKernelOps:
    if not ops.gemms_q8:
        pytest.skip("this CPU lacks AVX-512 VNNI and AVX2: int8 products go through a dequantised copy")
    return ops


def bf16_ulp(values: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 numbers at each value's magnitude (8 significant bits)."""
    exponent = torch.floor(torch.log2(values.abs().clamp_min(1e-30)))
    return torch.exp2(exponent - 7)


# Weight rows not a multiple of the kernel's block of 4, inner sizes not a multiple of 32, 1..8 rows.
SHAPES = [(1, 576, 960), (3, 100, 37), (8, 1536, 576), (5, 33, 8), (2, 7, 1), (7, 64, 130)]


@pytest.mark.parametrize(("rows", "inner", "outer"), SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_few_row_products_round_the_exact_result_once(gemm_ops, rows, inner, outer, with_bias):
    x, weight, bias = _operands(rows, inner, outer, with_bias)
    _assert_rounded_once(gemm_ops.linear(x, weight, bias), x, weight, bias)


def _operands(
    rows: int, inner: int, outer: int, with_bias: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(rows * inner + outer)
    x = torch.randn(rows, inner, generator=gen).bfloat16()
    weight = torch.randn(outer, inner, generator=gen).bfloat16()
    return x, weight, torch.randn(outer, generator=gen).bfloat16() if with_bias else None


def _assert_rounded_once(ours, x, weight, bias) -> None:
    """One rounding of a float32 sum: within a bfloat16 step of the exact value (torch's GEMM rounds the
    product before adding the bias, so it may be off by more), and equal to torch's in most places."""
    exact = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    assert ours.dtype == torch.bfloat16 and ours.shape == exact.shape
    assert ((ours.double() - exact).abs() <= bf16_ulp(exact) + 1e-4).all()
    matches = (ours == TORCH.linear(x, weight, bias)).double().mean().item()
    assert matches > 0.9, f"only {matches:.0%} of the outputs equal torch's"


@pytest.mark.parametrize(("rows", "inner", "outer"), SHAPES)
def test_few_row_float32_products_sum_in_float32(gemm_ops, rows, inner, outer):
    if torch.float32 not in gemm_ops.gemms:
        pytest.skip("this CPU has the bfloat16 product kernel only")
    gen = torch.Generator().manual_seed(rows + inner * outer)
    x, weight = torch.randn(rows, inner, generator=gen), torch.randn(outer, inner, generator=gen)
    bias = torch.randn(outer, generator=gen)
    ours = gemm_ops.linear(x, weight, bias)
    exact = x.double() @ weight.double().T + bias.double()
    # float32 sums in another order than torch's: both within a few float32 roundings of the exact value.
    torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=1e-5 * inner**0.5)
    torch.testing.assert_close(ours, TORCH.linear(x, weight, bias), rtol=1e-5, atol=1e-5 * inner**0.5)


def test_products_read_rows_of_a_wider_tensor(gemm_ops):
    """A view whose rows are further apart than its width (a slice of a fused projection's output)."""
    gen = torch.Generator().manual_seed(7)
    wide = torch.randn(4, 200, generator=gen).bfloat16()
    x = wide[:, 40:140]
    weight = torch.randn(50, 100, generator=gen).bfloat16()
    assert torch.equal(gemm_ops.linear(x, weight, None), gemm_ops.linear(x.contiguous(), weight, None))
    exact = x.double() @ weight.double().T
    assert ((gemm_ops.linear(x, weight, None).double() - exact).abs() <= bf16_ulp(exact) + 1e-4).all()


def test_what_the_product_kernel_does_not_take_is_torchs(gemm_ops):
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(16, 32, generator=gen).bfloat16()
    many_rows = torch.randn(gemm_ops.max_gemm_rows[torch.bfloat16] + 1, 32, generator=gen).bfloat16()
    for x, w in [(many_rows, weight), (many_rows[:2], weight.T.contiguous().T)]:
        assert torch.equal(gemm_ops.linear(x, w, None), TORCH.linear(x, w, None))


@pytest.fixture(scope="module")
def packed_ops(ops) -> CpuKernelOps:
    if ops.packed_gemm is None:
        pytest.skip("this CPU lacks AVX-512 BF16: bfloat16 weights stay unpacked")
    return ops


def test_packing_keeps_every_weight_and_unpacks_to_it():
    weight = torch.randn(37, 10).bfloat16()  # rows not a multiple of the panel: padded with zeros
    packed = pack(weight)
    assert packed.shape == (2, 5, PANEL, 2)
    assert packed[1, 3, 4].tolist() == weight[PANEL + 4, 6:8].tolist()
    assert (packed[1, :, 37 - PANEL :] == 0).all()
    assert torch.equal(unpack(packed, 37), weight)


# 1 to 100 rows (tiles of up to 12 rows, split evenly: 13 -> 7 + 6), outer sizes not a multiple of the
# panel of 32 (its last columns masked), inner sizes down to one pair.
PACKED_SHAPES = [
    (1, 576, 960),
    (5, 34, 37),
    (12, 2, 64),
    (13, 100, 33),
    (16, 1536, 96),
    (64, 96, 17),
    (100, 64, 70),
]


@pytest.mark.parametrize(("rows", "inner", "outer"), PACKED_SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_products_round_the_exact_result_once(packed_ops, rows, inner, outer, with_bias):
    x, weight, bias = _operands(rows, inner, outer, with_bias)
    _assert_rounded_once(packed_ops.linear_packed(x, pack(weight), bias, outer), x, weight, bias)
    assert torch.equal(TORCH.linear_packed(x, pack(weight), bias, outer), TORCH.linear(x, weight, bias))


@pytest.mark.parametrize(
    "inner", [100, 1536]
)  # 100: AVX-512 tiles on every CPU; 1536: AMX tiles where present
def test_a_packed_products_row_does_not_depend_on_the_rows_beside_it(packed_ops, inner):
    """A sequence's logits must not change with the batch it decodes in: each row of a product is the same
    alone and among 1 to 199 others (AMX takes 16 rows a tile and reads a short last tile from a padded
    copy that holds an earlier call's rows past the end; past 32 rows its passes over a panel take it a
    chunk at a time in turn, chunks of a different size past 128 rows)."""
    gen = torch.Generator().manual_seed(inner)
    x = torch.randn(200, inner, generator=gen).bfloat16()
    packed = pack(torch.randn(1000, inner, generator=gen).bfloat16())
    alone = torch.cat([packed_ops.linear_packed(x[i : i + 1], packed, None, 1000) for i in range(200)])
    for rows in (200, 97, 41, 40, 17, 16, 5, 2):
        assert torch.equal(packed_ops.linear_packed(x[-rows:], packed, None, 1000), alone[-rows:])


@pytest.mark.parametrize("inner", [100, 1536])
def test_a_packed_product_of_no_rows_is_empty(packed_ops, inner):
    """A step where no sequence samples asks the output head for zero rows: an empty result, not a crash
    (a division by the number of passes once killed the server with SIGFPE)."""
    packed = pack(torch.randn(64, inner).bfloat16())
    out = packed_ops.linear_packed(torch.empty(0, inner).bfloat16(), packed, None, 64)
    assert out.shape == (0, 64)


def test_packed_products_read_rows_of_a_wider_tensor(packed_ops):
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(20, 200, generator=gen).bfloat16()[:, 40:140]
    packed = pack(torch.randn(50, 100, generator=gen).bfloat16())
    assert torch.equal(
        packed_ops.linear_packed(x, packed, None, 50),
        packed_ops.linear_packed(x.contiguous(), packed, None, 50),
    )


def test_packed_products_round_as_torch_does_at_the_edges(packed_ops):
    """Sums that land halfway between two bfloat16 numbers round to the even one, as torch rounds; a sum
    past the largest float32 is infinity and a NaN stays NaN. (Denormal inputs are zero to the BF16 dot
    product instruction itself, as to the skinny kernel's.)"""
    x = torch.ones(1, 2).bfloat16()
    # Each output column is w[c, 0] + w[c, 1].
    weight = torch.tensor(
        [[1.0, 2**-8], [1.015625, -(2**-8)], [-1.0, -(2**-8)], [3.0e38, 3.0e38], [float("nan"), 1.0]]
    ).bfloat16()
    ours = packed_ops.linear_packed(x, pack(weight), None, 5)[0]
    assert ours[:4].tolist() == [1.0, 1.015625, -1.0, float("inf")]
    assert ours[:4].tolist() == weight.float().sum(dim=1).bfloat16()[:4].tolist()
    assert ours[4].isnan()


def test_pack_model_packs_the_bfloat16_projections_and_a_tied_head(tmp_path, smollm2_tokenizer):
    from tests.tiny_models import build_tiny_model
    from tokenmill import LLM

    directory = build_tiny_model("llama", tmp_path / "llama", smollm2_tokenizer)
    model = LLM(str(directory), dtype="bfloat16", num_blocks=64, cpu_kernels="torch").engine.runner.model
    embedding = model.embed_tokens.weight.clone()
    hidden = torch.randn(3, embedding.shape[1]).bfloat16()
    reference = model.compute_logits(hidden)
    pack_model(model)
    assert not any(type(m) is Linear for m in model.modules())
    assert isinstance(model.lm_head, PackedLinear) and not model.tie_word_embeddings
    assert torch.equal(model.embed_tokens.weight, embedding)  # the lookup keeps the table
    assert torch.equal(unpack(model.lm_head.packed, embedding.shape[0]), embedding)
    assert torch.equal(model.compute_logits(hidden), reference)  # torch's ops: the unpacked product


def test_without_native_bfloat16_larger_products_are_computed_in_float32(ops):
    """On AVX2 CPUs torch's bfloat16 GEMM is ~7x slower than its float32 one: prompt-sized products widen."""
    widening = CpuKernelOps(ops.kernel, native_bf16=False)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(40, 96, generator=gen).bfloat16()
    weight, bias = torch.randn(24, 96, generator=gen).bfloat16(), torch.randn(24, generator=gen).bfloat16()
    wide = torch.nn.functional.linear(x.float(), weight.float(), bias.float()).bfloat16()
    assert torch.equal(widening.linear(x, weight, bias), wide)
    values, scales = quantize_int8(weight.float())
    dequantised = (values.float() * scales[:, None]).bfloat16().float()
    expected = torch.nn.functional.linear(x.float(), dequantised).bfloat16()
    assert torch.equal(widening.linear_int8(x, values, scales, block_sums(values), None), expected)
    assert torch.equal(ops.linear(x, weight, bias), TORCH.linear(x, weight, bias))  # native: torch's own


def test_int8_quantization_keeps_each_weight_within_half_a_step():
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(6, 70, generator=gen)
    weight[2] = 0  # a row of zeros must not divide by zero
    values, scales = quantize_int8(weight)
    assert values.dtype == torch.int8 and scales.dtype == torch.float32 and scales.shape == (6,)
    assert values.abs().max() <= 127
    error = (values.float() * scales[:, None] - weight).abs()
    assert (error <= scales[:, None] / 2 + 1e-7).all()
    assert (values[2] == 0).all()


def blockwise_int8(x: torch.Tensor) -> torch.Tensor:
    """What the int8 kernel multiplies with: each row of x in blocks of 64 values, each block scaled to
    [-127, 127] and rounded in float32 with the kernel's very operations (x * (1 / step); bfloat16 inputs
    often lie on rounding ties, which x / step could break the other way), then scaled back (float64)."""
    rows, inner = x.shape
    padded = torch.nn.functional.pad(x.float(), (0, -inner % ACTIVATION_BLOCK)).view(
        rows, -1, ACTIVATION_BLOCK
    )
    step = padded.abs().amax(dim=2, keepdim=True) * torch.tensor(1 / 127, dtype=torch.float32)
    step = torch.where(step > 0, step, torch.ones_like(step))
    quantized = torch.round(padded * (1 / step))
    return (quantized.double() * step.double()).view(rows, -1)[:, :inner]


# Up to MAX_Q8_ROWS rows the int8 kernel computes; beyond, a dequantised copy goes to torch's GEMM.
@pytest.mark.parametrize(
    ("rows", "inner", "outer"), [*SHAPES, (MAX_Q8_ROWS, 96, 20), (MAX_Q8_ROWS + 3, 64, 9)]
)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_products_are_exact_on_what_they_multiply(q8_ops, rows, inner, outer, with_bias, dtype):
    """Few rows: exact int8 sums of the block-quantized rows of x and the int8 weights, rounded once.
    Many rows: torch's GEMM on x and the dequantised weights in x's dtype (bfloat16: it may round twice).
    float32 activations: the same int8 sums, summed over the blocks in float32."""
    gen = torch.Generator().manual_seed(rows * inner + outer + 1)
    x = torch.randn(rows, inner, generator=gen).to(dtype)
    values, scales = quantize_int8(torch.randn(outer, inner, generator=gen))
    bias = torch.randn(outer, generator=gen).to(dtype) if with_bias else None
    dequantised = values.double() * scales.double()[:, None]
    if rows <= MAX_Q8_ROWS:
        left, steps = blockwise_int8(x), 1
    else:
        left, dequantised, steps = x.double(), dequantised.to(dtype).double(), 2
    exact = left @ dequantised.T + (bias.double() if with_bias else 0)

    ours = q8_ops.linear_int8(x, values, scales, block_sums(values), bias)

    assert ours.dtype == dtype and ours.shape == (rows, outer)
    if dtype == torch.bfloat16:
        assert ((ours.double() - exact).abs() <= steps * bf16_ulp(exact) + 1e-4).all()
    else:
        torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=1e-5 * inner**0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_residual_add_and_rms_norm_give_torchs_values(ops, dtype, rows):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 576, generator=gen).to(dtype)
    residual = (3 * torch.randn(rows, 576, generator=gen)).to(dtype)
    weight = torch.randn(576, generator=gen).to(dtype)

    expected, expected_stream = TORCH.add_rms_norm(x, residual, weight, 1e-5)
    stream = residual.clone()
    normed, returned = ops.add_rms_norm(x, stream, weight, 1e-5)

    assert returned is stream, "the residual stream is updated in place"
    assert torch.equal(stream, expected_stream), "x + residual rounds as torch's add does"
    assert_close_to_torch(normed, expected)
    # Without a residual the input is the stream, unchanged.
    normed, returned = ops.add_rms_norm(x, None, weight, 1e-5)
    assert returned is x
    assert_close_to_torch(normed, TORCH.add_rms_norm(x, None, weight, 1e-5)[0])


def assert_close_to_torch(ours: torch.Tensor, expected: torch.Tensor) -> None:
    """float32: the sum of squares in another order; bfloat16: that may move a rounding by one step."""
    if ours.dtype == torch.float32:
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    else:
        differ = ours != expected
        assert differ.double().mean().item() < 0.01
        assert ((ours.float() - expected.float()).abs()[differ] <= bf16_ulp(expected.float())[differ]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 6])  # one token: a decode step, whose views have odd first strides
def test_rotary_in_place_gives_torchs_values(ops, dtype, tokens):
    heads, kv_heads, head_dim = 9, 3, 64
    rotary = RotaryEmbedding(head_dim, 4096, {"rope_theta": 10000.0, "rope_type": "default"})
    positions = torch.tensor([0, 1, 17, 500, 4095, 3])[:tokens]
    gen = torch.Generator().manual_seed(11)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    q_of = lambda t: t[:, : heads * head_dim].view(tokens, heads, head_dim)  # noqa: E731
    k_of = lambda t: t[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)  # noqa: E731
    expected_q, expected_k = TORCH.apply_rotary(q_of(qkv), k_of(qkv), TORCH.rope(rotary, positions, dtype))

    ours = qkv.clone()
    q, k = ops.apply_rotary(q_of(ours), k_of(ours), ops.rope(rotary, positions, dtype))

    assert q.data_ptr() == ours.data_ptr(), "rotated in place (by the kernel, not torch's fallback)"
    if dtype == torch.bfloat16:  # the same elementwise roundings as torch: equal bit for bit
        assert torch.equal(q, expected_q) and torch.equal(k, expected_k)
    else:
        torch.testing.assert_close((q, k), (expected_q, expected_k), rtol=1e-6, atol=1e-6)
    v_start = (heads + kv_heads) * head_dim
    assert torch.equal(ours[:, v_start:], qkv[:, v_start:]), "values are not rotated"


def test_rotary_of_separate_q_and_k_tensors_falls_back_to_torch(ops):
    rotary = RotaryEmbedding(8, 32, {"rope_theta": 10000.0, "rope_type": "default"})
    positions = torch.tensor([4, 9])
    q, k = torch.randn(2, 2, 8), torch.randn(2, 1, 8)
    expected = TORCH.apply_rotary(q, k, TORCH.rope(rotary, positions, torch.float32))
    ours = ops.apply_rotary(q.clone(), k.clone(), ops.rope(rotary, positions, torch.float32))
    torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_times_up_gives_torchs_values(ops, dtype):
    gen = torch.Generator().manual_seed(11)
    wide = (torch.randn(5, 2 * 300 + 8, generator=gen) * 4).to(dtype)
    gate_up = wide[:, : 2 * 300]  # rows further apart than their width, as in a wider buffer
    ours = ops.silu_mul(gate_up)
    expected = TORCH.silu_mul(gate_up)
    assert ours.dtype == dtype and ours.shape == (5, 300)
    if dtype == torch.float32:
        torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    else:  # silu rounded to bfloat16 before the product, as torch does: equal but where exp differs by an ulp
        assert ((ours.float() - expected.float()).abs() <= bf16_ulp(expected.float())).all()
        assert (ours == expected).float().mean() > 0.99
