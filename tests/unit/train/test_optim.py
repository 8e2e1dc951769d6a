import pytest
import torch

from gptcore.train.optim import Muon, orthogonalisation_dtype, orthogonalise


def muon_steps(opt_class, dtype=None, steps=3):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(48, 16)), torch.nn.Parameter(torch.randn(16, 40))]
    kwargs = {"ns_dtype": dtype} if dtype is not None else {}
    opt = opt_class(params, lr=0.02, weight_decay=0.1, **kwargs)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return [p.detach().clone() for p in params]


def test_muon_in_bf16_takes_torch_muons_steps():
    ours, torchs = muon_steps(Muon, torch.bfloat16), muon_steps(torch.optim.Muon)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ours, torchs))


def test_muon_in_fp32_takes_the_same_steps_within_bf16s_rounding():
    start = muon_steps(Muon, torch.float32, steps=0)
    fp32, bf16 = muon_steps(Muon, torch.float32), muon_steps(Muon, torch.bfloat16)
    for s, a, b in zip(start, fp32, bf16):
        assert (a - b).norm() < 0.02 * (b - s).norm()  # the updates agree to within 2%


@pytest.mark.parametrize("shape", [(64, 16), (16, 64), (32, 32)])
def test_orthogonalise_flattens_singular_values_a_hundredfold_apart(shape):
    torch.manual_seed(0)
    k = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], k))
    v, _ = torch.linalg.qr(torch.randn(shape[1], k))
    g = u @ torch.diag(torch.logspace(-1, 1, k)) @ v.T  # singular values from 0.1 to 10
    s = torch.linalg.svdvals(orthogonalise(g, torch.float32))
    assert s.shape == (k,) and s.min() > 0.6 and s.max() < 1.25


def test_orthogonalisation_runs_in_fp32_on_a_cpu_without_bf16_matmuls(monkeypatch):
    assert orthogonalisation_dtype(torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert orthogonalisation_dtype(torch.device("cpu")) == torch.float32
