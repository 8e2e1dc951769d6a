"""LoRA: starts at the pretrained model, merges to the full-rank update exactly, trains only what it should."""

from __future__ import annotations

import dataclasses

import torch
from safetensors.torch import load_file

from gptcore.checkpoint import load_classifier
from gptcore.config import ModelConfig
from gptcore.export import export_classifier_onnx
from gptcore.finetune import finetune
from gptcore.model import GPT, GPTClassifier
from gptcore.peft import LoRAEmbedding, LoRALinear, apply_lora, merge_lora, trainable_fraction
from tests.test_finetune import ft_cfg, pretrained  # noqa: F401  (module fixture)

TARGETS = ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj", "wte"]


def classifier(seed: int = 0) -> GPTClassifier:
    torch.manual_seed(seed)
    return GPTClassifier(GPT(ModelConfig(block_size=16, n_layer=2, n_head=2, n_embd=32, vocab_size=64)), 3).eval()


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    return ids, mask


def test_lora_starts_at_the_pretrained_model_and_merges_to_the_full_rank_update():
    base, model = classifier(), classifier()
    apply_lora(model, TARGETS, rank=4, alpha=8.0, trainable=("head",))
    with torch.no_grad():
        assert torch.equal(model(*inputs()), base(*inputs()))  # B = 0: nothing changed yet
        for m in model.modules():
            if isinstance(m, (LoRALinear, LoRAEmbedding)):
                (m.lora_b if isinstance(m, LoRALinear) else m.lora_a).normal_(std=0.1)  # the factor that starts at 0
        adapted = model(*inputs())
        qkv, wte = model.gpt.blocks[0].attn.qkv, model.gpt.wte
        full_rank = qkv.weight + 2.0 * qkv.lora_b @ qkv.lora_a  # alpha / rank = 2
        table = wte.weight + 2.0 * wte.lora_a @ wte.lora_b
        merge_lora(model)
        assert not any(isinstance(m, (LoRALinear, LoRAEmbedding)) for m in model.modules())
        assert torch.allclose(model.gpt.blocks[0].attn.qkv.weight, full_rank)
        assert torch.allclose(model.gpt.wte.weight, table)
        assert model.gpt.lm_head.weight is model.gpt.wte.weight  # still tied
        assert torch.allclose(model(*inputs()), adapted, atol=1e-5)
        assert not torch.allclose(adapted, base(*inputs()), atol=1e-3)


def test_lora_trains_only_the_low_rank_factors_and_the_head():
    model = classifier()
    wrapped = apply_lora(model, ["attn.qkv"], rank=2, alpha=4.0, trainable=("head",))
    assert wrapped == 2
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {f"gpt.blocks.{i}.attn.qkv.lora_{ab}" for i in range(2) for ab in "ab"} | {"head.weight", "head.bias"}
    assert 0 < trainable_fraction(model) < 0.05


def test_lora_finetune_leaves_the_gpt_frozen_and_exports_merged(small_corpus, pretrained, tmp_path):  # noqa: F811
    from gptcore.config import ExportConfig
    from gptcore.pretrain import load_pretrained

    cfg = dataclasses.replace(ft_cfg(), method="lora", lora_rank=4, lora_targets=TARGETS, lr=1e-2)
    result = finetune(cfg, pretrained, small_corpus["data"], small_corpus["tokenizer"], tmp_path / "ft")
    assert result.best_val_macro_f1 > 0.8
    before = load_file(f"{load_pretrained(pretrained).best_dir}/model.safetensors")
    after = load_file(f"{result.best_dir}/model.safetensors")
    for name in ("blocks.0.attn.qkv.weight", "blocks.1.mlp.fc.weight", "lm_head.weight"):  # lm_head: the tied table
        assert torch.equal(after[f"gpt.{name}"], before[name]), name
    assert after["gpt.blocks.0.attn.qkv.lora_b"].abs().sum() > 0  # the update trained
    model, _ = load_classifier(result.best_dir)
    assert not any(isinstance(m, (LoRALinear, LoRAEmbedding)) for m in model.modules())
    assert not torch.equal(model.gpt.blocks[0].attn.qkv.weight, before["blocks.0.attn.qkv.weight"])
    package = export_classifier_onnx(ExportConfig(), tmp_path / "ft", small_corpus["data"], small_corpus["tokenizer"],
                                tmp_path / "export")
    assert package.parity["max_abs_logit_diff"] < 1e-3
