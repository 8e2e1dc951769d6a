import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from gptcore.config import TrainConfig
from gptcore.model import GPT
from gptcore.results import load_pretrained
from gptcore.train.checkpoint import complete_checkpoints, latest_checkpoint
from gptcore.train.loop import TrainClock, fit_budget
from gptcore.train.optim import LRSchedule, Muon, configure_optimizers
from gptcore.train.pretrain import pretrain


def test_optimizer_decays_matrices_only(tiny_model_cfg):
    gpt = GPT(dataclasses.replace(tiny_model_cfg, vocab_size=64))
    (opt,) = configure_optimizers(gpt, TrainConfig(weight_decay=0.1), torch.device("cpu")).optimizers
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert id(gpt.wte.weight) in no_decay_ids and id(gpt.wpe.weight) in no_decay_ids  # embeddings (+ tied head)
    assert id(gpt.ln_f.weight) in no_decay_ids and id(gpt.blocks[0].attn.qkv.bias) in no_decay_ids
    assert all(p.dim() >= 2 for p in decay["params"])
    assert id(gpt.blocks[0].mlp.fc.weight) in {id(p) for p in decay["params"]}
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == len(list(gpt.parameters()))  # every parameter once, the tied one too


def test_lr_schedule_warms_up_then_decays_to_min():
    cfg = TrainConfig(max_steps=100, lr=1.0, min_lr=0.1, warmup_steps=10)
    at = LRSchedule(cfg)
    assert at(0) < at(5) < at(9) <= 1.0
    assert at(10) == pytest.approx(1.0)
    assert at(55) < at(10)
    assert at(100) == pytest.approx(0.1)
    at.total_steps = 50  # what a time budget fixes: the decay ends there
    assert at(50) == pytest.approx(0.1) and at(30) == pytest.approx(0.55)


class FakeClock(TrainClock):
    def __init__(self):
        super().__init__(torch.device("cpu"))

    def pause(self) -> None:  # the test sets .seconds
        pass


def test_time_budget_fixes_the_steps_from_the_probe_step_time():
    cfg = TrainConfig(max_steps=10_000, time_budget_s=10.0)
    clock, state = FakeClock(), {"budget_steps": None}
    clock.seconds = 1.0  # the first steps paid for compilation
    fit_budget("t", cfg, 5, 5, clock, state)
    clock.seconds = 3.0  # 20 steps in 2 s: 0.1 s a step
    fit_budget("t", cfg, 25, 25, clock, state)
    assert state["budget_steps"] == 25 + 70  # 7 s left
    state = {"budget_steps": None}
    fit_budget("t", TrainConfig(max_steps=60, time_budget_s=10.0), 5, 5, clock, state)
    clock.seconds = 5.0
    fit_budget("t", TrainConfig(max_steps=60, time_budget_s=10.0), 25, 25, clock, state)
    assert state["budget_steps"] == 60  # max_steps caps it


def test_time_budget_is_fit_again_as_the_step_time_drifts():
    cfg = TrainConfig(max_steps=10_000, time_budget_s=10.0)
    clock, state = FakeClock(), {"budget_steps": None}
    clock.seconds = 1.0
    fit_budget("t", cfg, 5, 5, clock, state)
    clock.seconds = 3.0  # the probe: 0.1 s a step
    fit_budget("t", cfg, 25, 25, clock, state)
    assert state["budget_steps"] == 95
    clock.seconds = 5.0  # 44 steps in 2 s after the probe's 20 in 2: 64 steps in 4 s since it began
    fit_budget("t", cfg, 69, 69, clock, state)
    assert state["budget_steps"] == 69 + 80  # 5 s left at 0.0625 s a step: more than the probe said
    clock.seconds = 9.9
    fit_budget("t", cfg, 70, 70, clock, state)
    assert state["budget_steps"] == 70  # one slow step and the budget is spent: it ends here
    clock.seconds = 10.5
    fit_budget("t", cfg, 72, 72, clock, state)
    assert state["budget_steps"] == 72  # past the budget it ends at this step, never before it
    old = {"budget_steps": 80}  # a checkpoint written before refitting: its steps stay as fixed
    fit_budget("t", cfg, 100, 30, clock, old)
    assert old == {"budget_steps": 80}


def test_budgeted_pretraining_ends_its_schedule_within_the_budget(
    small_corpus, tiny_model_cfg, tiny_train_cfg, tmp_path
):
    cfg = dataclasses.replace(
        tiny_train_cfg,
        max_steps=100_000,
        time_budget_s=2.0,
        eval_interval=100_000,
        checkpoint_interval=100_000,
        log_interval=10,
    )
    result = pretrain(tiny_model_cfg, cfg, small_corpus["tokenizer"], tmp_path / "p")
    assert 25 < result.steps < 100_000
    records = [json.loads(line) for line in (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "lr" in r][-1]
    assert last["step"] == result.steps and last["lr"] == pytest.approx(cfg.min_lr)  # the cosine finished
    assert "val_loss" in records[-1]  # evaluated at the end


def test_pretrain_learns_and_writes_best_and_checkpoints(small_corpus, tiny_model_cfg, tiny_train_cfg, tmp_path):
    result = pretrain(
        tiny_model_cfg,
        dataclasses.replace(tiny_train_cfg, max_steps=40, eval_interval=20, checkpoint_interval=20),
        small_corpus["tokenizer"],
        tmp_path / "pre",
    )
    assert result.steps == 40
    assert result.best_val_loss < 5.0  # ln(300) = 5.7 is the loss of a uniform guess
    assert (tmp_path / "pre" / "best" / "model.safetensors").is_file()
    assert [p.name for p in complete_checkpoints(tmp_path / "pre" / "checkpoints")] == ["step_000020", "step_000040"]
    assert load_pretrained(tmp_path / "pre") == result


def test_resume_continues_exactly(small_corpus, tiny_model_cfg, tiny_train_cfg, tmp_path):
    """Stopping at step 10 and resuming gives the same weights at step 20 as never stopping."""
    model_cfg = dataclasses.replace(tiny_model_cfg, dropout=0.1)  # dropout makes the RNG state matter
    pretrain(model_cfg, tiny_train_cfg, small_corpus["tokenizer"], tmp_path / "a")
    ckpts_b = tmp_path / "b" / "checkpoints"
    ckpts_b.mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step_000010", ckpts_b / "step_000010")
    pretrain(model_cfg, tiny_train_cfg, small_corpus["tokenizer"], tmp_path / "b", resume=True)
    a = load_file(tmp_path / "a" / "checkpoints" / "step_000020" / "model.safetensors")
    b = load_file(ckpts_b / "step_000020" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_incomplete_checkpoint_is_ignored_and_old_ones_pruned(small_corpus, tiny_model_cfg, tiny_train_cfg, tmp_path):
    cfg = dataclasses.replace(tiny_train_cfg, max_steps=30, checkpoint_interval=10, keep_checkpoints=2)
    pretrain(tiny_model_cfg, cfg, small_corpus["tokenizer"], tmp_path / "p")
    ckpts = tmp_path / "p" / "checkpoints"
    assert [p.name for p in complete_checkpoints(ckpts)] == ["step_000020", "step_000030"]
    crashed = ckpts / "step_000040"  # as if the process died while saving: no COMPLETE marker
    shutil.copytree(ckpts / "step_000030", crashed)
    (crashed / "COMPLETE").unlink()
    assert latest_checkpoint(ckpts).name == "step_000030"


def test_muon_takes_the_block_matrices_and_adamw_the_rest(tiny_model_cfg):
    gpt = GPT(dataclasses.replace(tiny_model_cfg, vocab_size=64, tie_embeddings=False))
    muon, adamw = configure_optimizers(gpt, TrainConfig(optimizer="muon"), torch.device("cpu")).optimizers
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    assert id(gpt.blocks[0].attn.qkv.weight) in muon_ids and id(gpt.blocks[1].mlp.proj.weight) in muon_ids
    assert id(gpt.wte.weight) not in muon_ids and id(gpt.lm_head.weight) not in muon_ids
    assert all(p.dim() == 2 for g in muon.param_groups for p in g["params"])
    n_params = sum(len(g["params"]) for o in (muon, adamw) for g in o.param_groups)
    assert n_params == len(list(gpt.parameters()))


def test_muon_run_resumes_exactly(small_corpus, tiny_model_cfg, tiny_train_cfg, tmp_path):
    cfg = dataclasses.replace(tiny_train_cfg, optimizer="muon")
    pretrain(tiny_model_cfg, cfg, small_corpus["tokenizer"], tmp_path / "a")
    ckpts_b = tmp_path / "b" / "checkpoints"
    ckpts_b.mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step_000010", ckpts_b / "step_000010")
    result = pretrain(tiny_model_cfg, cfg, small_corpus["tokenizer"], tmp_path / "b", resume=True)
    assert result.best_val_loss < 5.5
    a = load_file(tmp_path / "a" / "checkpoints" / "step_000020" / "model.safetensors")
    b = load_file(ckpts_b / "step_000020" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
