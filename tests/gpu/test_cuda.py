"""CUDA paths, where there is a GPU: skipped, saying why, elsewhere (tests/conftest.py)."""

import pytest
import torch

from gptcore.config import ModelConfig, TrainConfig
from gptcore.model import GPT
from gptcore.runtime import load_model
from gptcore.train.loop import autocast
from gptcore.train.optim import configure_optimizers

pytestmark = pytest.mark.gpu


def test_a_bf16_training_step_matches_fp32_and_fused_adamw_steps():
    torch.manual_seed(0)
    device = torch.device("cuda")
    gpt = GPT(ModelConfig(block_size=64, n_layer=2, n_head=2, n_embd=64, vocab_size=512)).to(device)
    x = torch.randint(0, 512, (8, 64), device=device)
    y = torch.roll(x, -1, dims=1)
    _, fp32 = gpt(x, targets=y)
    with autocast(device):
        _, bf16 = gpt(x, targets=y)
    assert bf16.dtype == torch.float32 and abs(bf16.item() - fp32.item()) < 0.02 * fp32.item()
    optimizers = configure_optimizers(gpt, TrainConfig(), device)
    assert all(group.get("fused") for o in optimizers.optimizers for group in o.param_groups)
    before = gpt.lm_head.weight.detach().clone()
    bf16.backward()
    optimizers.step()
    assert not torch.equal(before, gpt.lm_head.weight)


def test_onnx_runtime_cuda_decodes_as_the_cpu_does(lm_package):
    cpu = load_model(lm_package.package_dir, device="cpu", variant="fp32")
    cuda = load_model(lm_package.package_dir, device="cuda", variant="fp32")
    assert cuda.provider == "CUDAExecutionProvider" and cuda.device_type == "cuda"
    assert load_model(lm_package.package_dir, device="cuda").variant == "fp16"  # auto on CUDA
    prompt = cpu.encode("wave salt ship")
    assert cuda.generate_ids(prompt, 16, temperature=0.0) == cpu.generate_ids(prompt, 16, temperature=0.0)
