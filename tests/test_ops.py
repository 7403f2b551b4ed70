"""cl.models.ops / csrc: the fused mean-teacher kernel equals its PyTorch reference on random inputs.

The CPU build runs in CI (not slow-marked): one cold build per test session into a temporary CLBENCH_EXT_DIR
(the session fixture `ops_ext` in conftest.py, shared with tests/test_ema.py; `-s` prints the build time), then
the kernel is compared with `mean_teacher_update_ref` on random buffers: EMA alone, restore with the shared hash, the Fisher mask, and the
edge cases p = 0, p = 1, an empty buffer, rejected non-contiguous / wrong-dtype inputs. Without a C++ compiler
or ninja the kernel tests skip with the reason; the reference tests always run.
"""
import pytest
import torch

from cl.models import ops

pytestmark = pytest.mark.unit


@pytest.fixture
def ext(ops_ext):  # tests/conftest.py: built cold once per session
    return ops_ext


def _buffers(n, seed=0, with_mask=False):
    g = torch.Generator().manual_seed(seed)
    off, on, src = (torch.randn(n, generator=g) for _ in range(3))
    mask = torch.rand(n, generator=g) < 0.5 if with_mask else None
    return off, on, src, mask


def _both(off, on, src, mask, decay, p, seed):
    a_off, a_on, b_off, b_on = off.clone(), on.clone(), off.clone(), on.clone()
    assert ops.mean_teacher_update_(a_off, a_on, src, decay, p, seed, mask, impl="torch") == "torch"
    assert ops.mean_teacher_update_(b_off, b_on, src, decay, p, seed, mask, impl="ext") == "ext"
    return (a_off, a_on), (b_off, b_on)


def test_reference_ema_and_restore_by_hand():
    off, on = torch.zeros(1000), torch.ones(1000)
    src = torch.full((1000,), -5.0)
    ops.mean_teacher_update_(off, on, src, decay=0.75, restore_prob=0.3, seed=7, impl="torch")
    assert torch.allclose(off, torch.full((1000,), 0.25))
    u = ops.hash_uniform(7, 1000)
    assert torch.equal(on == -5.0, u < 0.3)
    assert 0.2 < (on == -5.0).float().mean() < 0.4


def test_hash_uniform_is_uniform():
    u = ops.hash_uniform(3, 200_000)
    assert 0 <= u.min() and u.max() < 1
    hist = torch.histc(u, bins=10, min=0, max=1) / u.numel()
    assert torch.all((hist - 0.1).abs() < 0.005)


def test_bad_arguments_are_one_line_errors():
    off, on = torch.zeros(10), torch.zeros(10)
    with pytest.raises(ValueError, match="source buffer"):
        ops.mean_teacher_update_(off, on, None, 0.9, 0.5, impl="torch")
    with pytest.raises(ValueError, match="impl"):
        ops.mean_teacher_update_(off, on, None, 0.9, impl="cuda")
    with pytest.raises(ValueError, match="contiguous float32"):  # checked before any build
        ops.mean_teacher_update_(torch.zeros(4, 5).t(), torch.zeros(4, 5).t(), None, 0.9, impl="ext")


@pytest.mark.e2e
@pytest.mark.parametrize("decay,p,with_mask", [(0.999, 0.0, False), (0.3, 0.01, False), (0.9, 0.2, True),
                                               (0.6, 1.0, False), (0.6, 1.0, True)])
def test_cpu_kernel_matches_reference(ext, decay, p, with_mask):
    off, on, src, mask = _buffers(300_001, with_mask=with_mask)
    (a_off, a_on), (b_off, b_on) = _both(off, on, src, mask, decay, p, 11)
    torch.testing.assert_close(b_off, a_off, atol=1e-6, rtol=1e-6)
    assert torch.equal(b_on, a_on)  # exactly the same elements restored
    restored = b_on == src
    if p == 0:
        assert torch.equal(b_on, on)
    elif p == 1:  # every element (under the mask) goes back to the source
        assert torch.all(restored if mask is None else restored[mask])
        if mask is not None:
            assert torch.equal(b_on[~mask], on[~mask])
    else:
        assert abs(restored.float().mean().item() - p * (0.5 if with_mask else 1.0)) < 0.01


@pytest.mark.e2e
def test_cpu_kernel_ema_is_the_lerp_formula_on_both_sides_of_half(ext):
    # torch.lerp switches formula at weight 0.5; the kernel must follow it (decay 0.3 -> w 0.7, 0.999 -> 0.001)
    for decay in (0.3, 0.5, 0.999, 0.0, 1.0):
        off, on, src, _ = _buffers(10_007, seed=1)
        (a_off, _), (b_off, _) = _both(off, on, src, None, decay, 0.0, 0)
        # not bitwise: ATen's vectorised lerp fuses multiply-adds (FMA), the kernel's -O2 x86-64 code does not
        torch.testing.assert_close(b_off, a_off, atol=1e-6, rtol=1e-6)


@pytest.mark.e2e
def test_cpu_kernel_edge_cases(ext):
    empty = torch.empty(0)
    assert ops.mean_teacher_update_(empty, empty.clone(), empty.clone(), 0.9, 0.5, 3, impl="ext") == "ext"
    # different seeds restore different elements, the same seed the same ones
    off, on, src, _ = _buffers(50_000, seed=2)
    _, (x_off, x_on) = _both(off, on, src, None, 0.9, 0.3, 1)
    _, (y_off, y_on) = _both(off, on, src, None, 0.9, 0.3, 2)
    _, (z_off, z_on) = _both(off, on, src, None, 0.9, 0.3, 1)
    assert torch.equal(x_on, z_on) and not torch.equal(x_on, y_on)
    # the raw operator rejects what the Python wrapper would have refused
    with pytest.raises(RuntimeError, match="contiguous"):
        ext(torch.zeros(4, 5).t(), torch.zeros(4, 5).t(), torch.empty(0), torch.empty(0, dtype=torch.bool),
            0.9, 0.0, 0)
    with pytest.raises(RuntimeError, match="float32"):
        ext(torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64), torch.empty(0),
            torch.empty(0, dtype=torch.bool), 0.9, 0.0, 0)
    with pytest.raises(RuntimeError, match="src"):
        ext(torch.zeros(5), torch.zeros(5), torch.zeros(4), torch.empty(0, dtype=torch.bool), 0.9, 0.5, 0)
    with pytest.raises(RuntimeError, match="mask"):
        ext(torch.zeros(5), torch.zeros(5), torch.zeros(5), torch.ones(4, dtype=torch.bool), 0.9, 0.5, 0)


@pytest.mark.gpu
def test_cuda_kernel_matches_reference():
    if not torch.cuda.is_available():
        pytest.skip("CI has no GPU")
    m = ops.load_extension()
    assert m is not None, ops.extension_error()
    n = 1_000_003
    off, on, src = (torch.randn(n, device="cuda") for _ in range(3))
    mask = torch.rand(n, device="cuda") < 0.5
    a_off, a_on, b_off, b_on = off.clone(), on.clone(), off.clone(), on.clone()
    ops.mean_teacher_update_(a_off, a_on, src, 0.99, 0.05, 5, mask, impl="torch")
    ops.mean_teacher_update_(b_off, b_on, src, 0.99, 0.05, 5, mask, impl="ext")
    torch.testing.assert_close(b_off, a_off, atol=1e-6, rtol=1e-6)
    assert torch.equal(b_on, a_on)
