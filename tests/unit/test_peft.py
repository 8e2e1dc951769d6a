"""Fine-tuning methods: each starts where it should, trains only what it should, reloads and exports with parity."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from gptcore.config import ExportConfig, FinetuneConfig, ModelConfig, PeftConfig
from gptcore.errors import ConfigError
from gptcore.export.classifier import export_classifier_onnx
from gptcore.model import GPT, GPTClassifier
from gptcore.peft import (
    AdapterLinear,
    LoRAEmbedding,
    LoRALinear,
    Prefix,
    apply_peft,
    merge_peft,
    restore_peft,
    trainable_fraction,
)
from gptcore.presets import PRESETS, merge
from gptcore.train.finetune import finetune
from gptcore.weights import load_classifier, save_weights, tied_aliases, without_aliases
from tests.unit.train.test_finetune import ft_cfg

TARGETS = ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj", "wte"]
MODEL = ModelConfig(block_size=16, n_layer=2, n_head=2, n_embd=32, vocab_size=64)


def classifier(seed: int = 0) -> GPTClassifier:
    torch.manual_seed(seed)
    return GPTClassifier(GPT(MODEL), 3).eval()


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    return ids, mask


def trainable_names(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def perturb(model: torch.nn.Module) -> None:
    """Move every trainable parameter of the method off its start (LoRA's and adapters' zero factors included)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and not name.startswith("head."):
                p.add_(torch.randn_like(p) * 0.1)


def test_lora_starts_at_the_pretrained_model_and_merges_to_the_full_rank_update():
    base, model = classifier(), classifier()
    apply_peft(model, PeftConfig(method="lora", lora_targets=TARGETS, lora_rank=4, lora_alpha=8.0), trainable=("head",))
    with torch.no_grad():
        assert torch.equal(model(*inputs()), base(*inputs()))  # B = 0: nothing changed yet
        for m in model.modules():
            if isinstance(m, (LoRALinear, LoRAEmbedding)):
                (m.lora_b if isinstance(m, LoRALinear) else m.lora_a).normal_(std=0.1)  # the factor that starts at 0
        adapted = model(*inputs())
        qkv, wte = model.gpt.blocks[0].attn.qkv, model.gpt.wte
        full_rank = qkv.weight + 2.0 * qkv.lora_b @ qkv.lora_a  # alpha / rank = 2
        table = wte.weight + 2.0 * wte.lora_a @ wte.lora_b
        merge_peft(model)
        assert not any(isinstance(m, (LoRALinear, LoRAEmbedding)) for m in model.modules())
        assert torch.allclose(model.gpt.blocks[0].attn.qkv.weight, full_rank)
        assert torch.allclose(model.gpt.wte.weight, table)
        assert model.gpt.lm_head.weight is model.gpt.wte.weight  # still tied
        assert torch.allclose(model(*inputs()), adapted, atol=1e-5)
        assert not torch.allclose(adapted, base(*inputs()), atol=1e-3)


def test_lora_trains_only_the_low_rank_factors_and_the_head():
    model = classifier()
    description = apply_peft(
        model, PeftConfig(method="lora", lora_targets=["attn.qkv"], lora_rank=2, lora_alpha=4.0), trainable=("head",)
    )
    assert description == {"method": "lora", "targets": ["attn.qkv"], "rank": 2, "alpha": 4.0, "dropout": 0.0}
    names = trainable_names(model)
    assert names == {f"gpt.blocks.{i}.attn.qkv.lora_{ab}" for i in range(2) for ab in "ab"} | {
        "head.weight",
        "head.bias",
    }
    assert 0 < trainable_fraction(model) < 0.05


def test_adapters_start_at_the_pretrained_model_and_train_with_the_norms_only():
    base, model = classifier(), classifier()
    assert apply_peft(model, PeftConfig(method="adapter", adapter_size=4), trainable=("head",)) == {
        "method": "adapter",
        "size": 4,
    }
    wrapped = [n for n, m in model.named_modules() if isinstance(m, AdapterLinear)]
    assert wrapped == [f"gpt.blocks.{i}.{layer}" for i in range(2) for layer in ("attn.proj", "mlp.proj")]
    with torch.no_grad():
        assert torch.equal(model(*inputs()), base(*inputs()))  # up = 0: nothing changed yet
    names = trainable_names(model)
    adapters = {f"{n}.{lin}.{p}" for n in wrapped for lin in ("down", "up") for p in ("weight", "bias")}
    norms = {
        f"gpt.{ln}.{p}"
        for ln in ("blocks.0.ln_1", "blocks.0.ln_2", "blocks.1.ln_1", "blocks.1.ln_2", "ln_f")
        for p in ("weight", "bias")
    }
    assert names == adapters | norms | {"head.weight", "head.bias"}
    assert "gpt.blocks.0.attn.proj.weight" in dict(model.named_parameters())  # the base's names kept
    assert 0 < trainable_fraction(model) < 0.25


def test_adapters_and_lora_work_on_a_bare_gpt_but_a_prefix_needs_the_classifier():
    torch.manual_seed(0)
    base = GPT(MODEL).eval()
    for cfg in (PeftConfig(method="adapter"), PeftConfig(method="lora", lora_targets=TARGETS)):
        lm = GPT(MODEL).eval()
        lm.load_state_dict(base.state_dict())
        apply_peft(lm, cfg)
        with torch.no_grad():
            assert torch.equal(lm(inputs()[0])[0], base(inputs()[0])[0])
        assert 0 < trainable_fraction(lm) < 1
    with pytest.raises(ValueError, match="prefix-tuning needs a GPTClassifier.*not a GPT"):
        apply_peft(GPT(MODEL), PeftConfig(method="prefix"))


def test_a_prefix_is_a_learned_past_the_tokens_read_before_the_passage_at_their_own_positions():
    model = classifier()
    apply_peft(model, PeftConfig(method="prefix", prefix_tokens=5), trainable=("head",))
    assert trainable_names(model) == {"prefix.keys", "prefix.values", "head.weight", "head.bias"}
    assert 0 < trainable_fraction(model) < 0.1
    z = torch.randint(0, 64, (5,), generator=torch.Generator().manual_seed(2))
    model.prefix.start_from(model.gpt, z)
    ids, mask = inputs()
    # The pretrained GPT reading z, then the passage with its positions starting again at 0 (P + T > block_size):
    # exactly what the prefix started from z computes, pooled at the passage's last real token.
    both = torch.cat([z.expand(4, 5), ids], dim=1)
    positions = torch.cat([torch.arange(5), torch.arange(16)]).unsqueeze(0)
    with torch.no_grad():
        h, _ = model.gpt.hidden_states(both, position_ids=positions)
        expected = model.head(h[torch.arange(4), 5 + mask.sum(1) - 1])
        assert torch.allclose(model(ids, mask), expected, atol=1e-5)
        assert not torch.allclose(model(ids, mask), classifier()(ids, mask), atol=1e-3)  # the prefix is read


@pytest.mark.parametrize("method", ["lora", "adapter", "prefix"])
def test_every_method_round_trips_through_save_and_load_classifier(method, tmp_path):
    model = classifier()
    description = apply_peft(
        model, PeftConfig(method=method, lora_targets=TARGETS, prefix_tokens=3), trainable=("head",)
    )
    perturb(model)
    meta = {"kind": "classifier", "model": dataclasses.asdict(MODEL), "labels": ["a", "b", "c"], "peft": description}
    save_weights(without_aliases(model.state_dict(), tied_aliases(model)), tmp_path / "best", meta)
    loaded, _ = load_classifier(tmp_path / "best")
    with torch.no_grad():
        assert torch.allclose(loaded(*inputs()), model(*inputs()), atol=1e-5)
        assert not torch.allclose(loaded(*inputs()), classifier()(*inputs()), atol=1e-3)


def test_restore_peft_refuses_an_unknown_method():
    with pytest.raises(ValueError, match="unknown fine-tuning method 'bitfit'"):
        restore_peft(classifier(), {"method": "bitfit"})


def test_peft_fields_are_flat_finetune_keys_checked_by_name():
    cfg = merge(PRESETS["tiny"](), {"finetune": {"method": "adapter", "adapter_size": 8}})
    assert (cfg.finetune.method, cfg.finetune.adapter_size) == ("adapter", 8)
    assert isinstance(cfg.finetune, PeftConfig) and isinstance(FinetuneConfig(), PeftConfig)
    for field, value, message in [
        ("method", "bitfit", "must be one of"),
        ("adapter_size", 0, "must be > 0"),
        ("prefix_tokens", -1, "must be > 0"),
        ("lora_targets", ["mlp"], "must be a non-empty subset"),
    ]:
        with pytest.raises(ConfigError, match=rf"finetune\.{field}: {message}"):
            merge(PRESETS["tiny"](), {"finetune": {field: value}})
        with pytest.raises(ConfigError, match=rf"^{field}: {message}"):
            PeftConfig(**{field: value})
    with pytest.raises(ConfigError, match=r"finetune: unknown field\(s\) \['adapter_width'\]"):
        merge(PRESETS["tiny"](), {"finetune": {"adapter_width": 8}})


def test_lora_finetune_leaves_the_gpt_frozen_and_exports_merged(small_corpus, pretrained, tmp_path):
    from gptcore.results import load_pretrained

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
    package = export_classifier_onnx(
        ExportConfig(), tmp_path / "ft", small_corpus["data"], small_corpus["tokenizer"], tmp_path / "export"
    )
    assert package.parity["max_abs_logit_diff"] < 1e-3


@pytest.mark.parametrize(
    "method, added, frozen",
    [
        (
            "adapter",
            "gpt.blocks.0.attn.proj.up.weight",
            ("blocks.0.attn.qkv.weight", "blocks.1.mlp.proj.weight", "lm_head.weight"),
        ),
        ("prefix", "prefix.keys", ("blocks.0.attn.qkv.weight", "blocks.1.ln_2.weight", "lm_head.weight")),
    ],
    ids=["adapter", "prefix"],
)
def test_adapter_and_prefix_finetunes_leave_the_gpt_frozen_and_export_as_modules(
    method,
    added,
    frozen,
    small_corpus,
    pretrained,
    tmp_path,
):
    from gptcore.results import load_pretrained

    cfg = dataclasses.replace(ft_cfg(), method=method, adapter_size=8, prefix_tokens=4, lr=1e-2)
    result = finetune(cfg, pretrained, small_corpus["data"], small_corpus["tokenizer"], tmp_path / "ft")
    assert result.best_val_macro_f1 > 0.8
    before = load_file(f"{load_pretrained(pretrained).best_dir}/model.safetensors")
    after = load_file(f"{result.best_dir}/model.safetensors")
    for name in frozen:
        assert torch.equal(after[f"gpt.{name}"], before[name]), name
    assert set(before) <= {n.removeprefix("gpt.") for n in after}  # the base's names, plus the method's
    assert after[added].abs().sum() > 0  # an adapter's up starts at zero: it trained
    model, meta = load_classifier(result.best_dir)
    assert meta["peft"]["method"] == method and 0 < meta["trainable_fraction"] < 0.2
    assert any(isinstance(m, (AdapterLinear, Prefix)) for m in model.modules())
    package = export_classifier_onnx(
        ExportConfig(), tmp_path / "ft", small_corpus["data"], small_corpus["tokenizer"], tmp_path / "export"
    )
    assert package.parity["max_abs_logit_diff"] < 1e-3
    assert package.parity["predictions_equal"] == package.parity["inputs"]
