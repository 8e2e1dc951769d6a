"""Training's CUDA paths, where there is a GPU (skipped, saying why, elsewhere: tests/conftest.py):
bf16 autocast against fp32, fused AdamW, torch.compile, and one NCCL rank under DDP."""

import pytest
import torch
import torch.distributed as dist

from gptcore.config import ModelConfig, TrainConfig
from gptcore.model import GPT
from gptcore.processes import free_port
from gptcore.train.distributed import DistInfo
from gptcore.train.loop import autocast
from gptcore.train.optim import configure_optimizers
from gptcore.train.parallel import Replicated

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")


def small_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(block_size=64, n_layer=2, n_head=2, n_embd=64, vocab_size=512)).to(CUDA)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, 512, (8, 64), device=CUDA, generator=torch.Generator(CUDA).manual_seed(0))
    return x, torch.roll(x, -1, dims=1)


def test_a_bf16_training_step_matches_fp32_and_fused_adamw_steps():
    gpt, (x, y) = small_gpt(), batch()
    _, fp32 = gpt(x, targets=y)
    with autocast(CUDA):
        _, bf16 = gpt(x, targets=y)
    assert bf16.dtype == torch.float32 and abs(bf16.item() - fp32.item()) < 0.02 * fp32.item()
    optimizers = configure_optimizers(gpt, TrainConfig(), CUDA)
    assert all(group.get("fused") for o in optimizers.optimizers for group in o.param_groups)
    before = gpt.lm_head.weight.detach().clone()
    bf16.backward()
    optimizers.step()
    assert not torch.equal(before, gpt.lm_head.weight)


def test_the_compiled_model_agrees_with_eager_and_trains():
    gpt, (x, y) = small_gpt(), batch()
    compiled = torch.compile(gpt)
    with torch.no_grad(), autocast(CUDA):
        eager_logits, _ = gpt(x)
        compiled_logits, _ = compiled(x)
    assert (compiled_logits.float() - eager_logits.float()).abs().max().item() < 0.05
    optimizers = configure_optimizers(gpt, TrainConfig(lr=3e-3), CUDA)
    losses = []
    for _ in range(20):  # one batch, learned by heart: the loss must fall
        optimizers.zero_grad()
        with autocast(CUDA):
            _, loss = compiled(x, targets=y)
        loss.backward()
        optimizers.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_one_nccl_rank_initialises_and_a_ddp_step_runs(monkeypatch):
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=CUDA)
    try:
        assert dist.get_backend() == "nccl"
        info = DistInfo(rank=0, world_size=1, local_rank=0, device=CUDA)
        gpt, (x, y) = small_gpt(), batch()
        ddp = Replicated(info).wrap(gpt)
        optimizers = configure_optimizers(gpt, TrainConfig(), CUDA)
        with autocast(CUDA):
            _, loss = ddp(x, targets=y)
        loss.backward()
        total = torch.ones(1, device=CUDA)
        dist.all_reduce(total)
        before = gpt.lm_head.weight.detach().clone()
        optimizers.step()
        assert total.item() == 1.0 and not torch.equal(before, gpt.lm_head.weight)
    finally:
        dist.destroy_process_group()
