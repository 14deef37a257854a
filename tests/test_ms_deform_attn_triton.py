"""The Triton kernels of multi-scale deformable attention, run on the CPU by Triton's
interpreter: forward and all three gradients equal the PyTorch path (odd level sizes,
points outside the maps, padding), gradcheck in float64, half precision under autocast,
and the choice of implementation."""
import importlib
import os

import pytest
import torch
from detectron2.modeling import build_model

from instunique.segmenters.mask2former import ms_deform_attn as msda
from instunique.segmenters.mask2former.ms_deform_attn import (
    MSDeformAttn,
    check_impl,
    ms_deform_attn_sample,
)

from utils import get_config, tiny_opts

KERNELS = "instunique.segmenters.mask2former.ms_deform_attn_triton"
SHAPES = [(5, 7), (3, 4), (2, 1), (1, 1)]


@pytest.fixture(scope="module")
def kernels():
    """The kernel module; tests/conftest.py set TRITON_INTERPRET=1 before triton's import.
    Skipped where triton is not installed (torch's CUDA wheels bring it)."""
    pytest.importorskip("triton")
    assert os.environ.get("TRITON_INTERPRET") == "1"
    return importlib.import_module(KERNELS)


def _problem(shapes, b=2, q=3, n_heads=2, d_head=6, points=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(b, s, n_heads, d_head, generator=g, dtype=dtype)
    # Points up to 30% beyond every edge, so corners fall outside the maps.
    locations = torch.rand(b, q, n_heads, len(shapes), points, 2, generator=g,
                           dtype=dtype) * 1.6 - 0.3
    locations[0, 0, 0, 0, 0] = torch.tensor([0.0, 1.0])  # exactly on the edges
    weights = torch.rand(b, q, n_heads, len(shapes), points, generator=g, dtype=dtype)
    return value, locations, weights


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("shapes", [SHAPES, [(4, 4)]], ids=["4 odd levels", "1 level"])
def test_forward_and_gradients_equal_pytorch(kernels, dtype, tol, shapes):
    inputs = [t.requires_grad_() for t in _problem(shapes, dtype=dtype)]
    ours = kernels.ms_deform_attn_sample_triton(inputs[0], shapes, *inputs[1:])
    ref = ms_deform_attn_sample(inputs[0], shapes, *inputs[1:])
    assert ours.shape == ref.shape and ours.dtype == dtype
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)
    grad = torch.randn_like(ref)
    expected = torch.autograd.grad(ref, inputs, grad)
    for a, b in zip(torch.autograd.grad(ours, inputs, grad), expected):
        torch.testing.assert_close(a, b, rtol=tol * 10, atol=tol * 10)


def test_gradcheck_float64(kernels):
    shapes = [(2, 3), (1, 2)]
    inputs = [t.requires_grad_() for t in _problem(shapes, b=1, q=2, n_heads=1, d_head=2,
                                                   points=1)]
    assert torch.autograd.gradcheck(
        lambda v, loc, w: kernels.ms_deform_attn_sample_triton(v, shapes, loc, w), inputs,
        fast_mode=True)


def test_half_precision_values_under_autocast(kernels):
    value, locations, weights = _problem(SHAPES, dtype=torch.float32)
    ref = ms_deform_attn_sample(value, SHAPES, locations, weights)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = kernels.ms_deform_attn_sample_triton(value.bfloat16(), SHAPES, locations, weights)
    assert ours.dtype == torch.bfloat16 and torch.isfinite(ours).all()
    torch.testing.assert_close(ours.float(), ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("padding", ["some", "none"])
def test_module_with_triton_equals_pytorch(kernels, padding):
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2).double()
    shapes = torch.tensor([[3, 5], [2, 2]])
    b, q, s = 2, 4, 19
    query = torch.randn(b, q, 16, dtype=torch.float64)
    source = torch.randn(b, s, 16, dtype=torch.float64)
    reference = torch.rand(b, q, 2, 2, dtype=torch.float64)
    mask = torch.zeros(b, s, dtype=torch.bool)
    if padding == "some":
        mask[1, 10:] = True
    outputs = {}
    for impl in ("pytorch", "triton"):
        attn.impl = impl
        outputs[impl] = attn(query, reference, source, shapes, torch.tensor([0, 15]), mask)
    torch.testing.assert_close(outputs["triton"], outputs["pytorch"], rtol=1e-10, atol=1e-10)


def test_auto_takes_pytorch_on_the_cpu(monkeypatch):
    assert not msda._use_triton("auto", torch.zeros(1))
    calls = []
    monkeypatch.setattr(msda, "ms_deform_attn_sample",
                        lambda *a: calls.append(1) or ms_deform_attn_sample(*a))
    attn = MSDeformAttn(d_model=8, n_levels=1, n_heads=2, n_points=1)
    assert attn.impl == "auto"
    attn(torch.randn(1, 2, 8), torch.rand(1, 2, 1, 2), torch.randn(1, 6, 8),
         torch.tensor([[2, 3]]), torch.tensor([0]))
    assert calls == [1]


def test_bad_choices_name_the_key(monkeypatch, kernels):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="MODEL.SEM_SEG_HEAD.DEFORM_ATTN_IMPL must be one of"):
        check_impl("cuda")
    with pytest.raises(ValueError, match="DEFORM_ATTN_IMPL 'triton' runs on CUDA"):
        build_model(get_config("shapes/mask2former_shapes.yaml", *tiny_opts(),
                               "MODEL.SEM_SEG_HEAD.DEFORM_ATTN_IMPL", "triton"))


def test_the_key_reaches_every_attention_module():
    model = build_model(get_config("shapes/mask2former_shapes.yaml", *tiny_opts(),
                                   "MODEL.SEM_SEG_HEAD.DEFORM_ATTN_IMPL", "pytorch"))
    impls = [m.impl for m in model.modules() if isinstance(m, MSDeformAttn)]
    assert impls and set(impls) == {"pytorch"}
