"""cl.ops / csrc: the fused mean-teacher kernel equals its PyTorch reference on random inputs (CPU build)."""
import os
import shutil

import pytest
import torch

from cl import ops


@pytest.fixture(scope="module")
def ext():
    if shutil.which("ninja") is None and not os.path.exists(os.path.join(os.path.dirname(os.sys.executable), "ninja")):
        pytest.skip("ninja is not installed (pip install -e .[kernels])")
    m = ops.load_extension()
    assert m is not None, ops.extension_error()
    return m


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


@pytest.mark.slow  # the first C++ build takes ~1 min of CPU on 2 cores (3 min on a loaded machine)
@pytest.mark.parametrize("decay,p,with_mask", [(0.999, 0.0, False), (0.3, 0.01, False), (0.9, 0.2, True)])
def test_cpu_kernel_matches_reference(ext, decay, p, with_mask):
    g = torch.Generator().manual_seed(0)
    n = 300_001
    off, on, src = (torch.randn(n, generator=g) for _ in range(3))
    mask = torch.rand(n, generator=g) < 0.5 if with_mask else None
    a_off, a_on, b_off, b_on = off.clone(), on.clone(), off.clone(), on.clone()
    ops.mean_teacher_update_(a_off, a_on, src, decay, p, 11, mask, impl="torch")
    assert ops.mean_teacher_update_(b_off, b_on, src, decay, p, 11, mask, impl="ext") == "ext"
    torch.testing.assert_close(b_off, a_off, atol=1e-6, rtol=1e-6)
    assert torch.equal(b_on, a_on)  # exactly the same elements restored


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
