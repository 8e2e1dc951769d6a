"""Chat SFT on a real (tiny) pretrained GPT: the vocabulary grows safely, training lowers held-out
response bpb against the base model, and the outputs are whole."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gptcore.config import ModelConfig, SFTConfig
from gptcore.errors import InputError
from gptcore.eval.chat import evaluate_sft
from gptcore.model import GPT
from gptcore.results import load_sft, load_tokenizer
from gptcore.runtime.template import END, add_chat_tokens
from gptcore.train.sft import sft
from gptcore.weights import load_lm
from tests.conftest import sft_cfg


def test_grow_vocab_keeps_old_logits_and_grows_past_the_padding():
    torch.manual_seed(0)
    gpt = GPT(ModelConfig(block_size=8, n_layer=1, n_head=2, n_embd=16, vocab_size=62)).eval()
    ids = torch.randint(0, 62, (2, 8))
    before = gpt(ids)[0][..., :62]
    gpt.grow_vocab(70)  # 64 padded rows -> 128
    assert gpt.wte.weight.shape[0] == 128 and gpt.lm_head.weight is gpt.wte.weight and gpt.cfg.vocab_size == 70
    torch.testing.assert_close(gpt(ids)[0][..., :62], before)
    torch.testing.assert_close(gpt.wte.weight[65], gpt.wte.weight[:62].mean(dim=0))


@pytest.fixture
def chat_run(chat_trained):
    return chat_trained


def test_sft_lowers_held_out_response_bpb_against_the_base(chat_run):
    report = chat_run["report"]
    assert report.tuned["response_bpb"] < report.base["response_bpb"]
    assert report.bpb_gain_ci[0] > 0  # significant over the held-out conversations, not noise
    assert report.tuned["response_loss"] < report.base["response_loss"]


def test_sft_outputs_load_with_the_chat_tokens(chat_run, trained):
    result = load_sft(chat_run["root"] / "sft")
    tok = load_tokenizer(chat_run["root"] / "sft")
    model, meta = load_lm(result.best_dir)
    base_vocab = load_tokenizer(trained["tokenizer"]).get_vocab_size()
    assert model.cfg.vocab_size == tok.get_vocab_size() == base_vocab + 4
    assert meta["sft"]["chat_tokens"][END] == tok.token_to_id(END)
    samples = Path(chat_run["report"].samples_path).read_text(encoding="utf-8")
    assert samples.count("## Prompt") == 2 and "| base | fine-tuned |" in samples
    client = chat_run["tracking"].client()
    runs = {
        r.data.tags["gptcore.stage"]: r
        for r in client.search_runs([client.get_experiment_by_name("test").experiment_id])
    }
    assert runs["sft"].data.metrics["best/val_response_loss"] == pytest.approx(result.best_val_response_loss)
    assert runs["evaluate_sft"].data.metrics["test/tuned_response_bpb"] == pytest.approx(
        chat_run["report"].tuned["response_bpb"]
    )
    artifacts = {a.path for a in client.list_artifacts(runs["evaluate_sft"].info.run_id)}
    assert {"sft_eval.json", "sft_samples.md"} <= artifacts


def test_sft_resumes_from_its_checkpoint(chat_run, trained, tmp_path):
    cfg = chat_run["cfg"]
    shutil.copytree(chat_run["root"] / "sft", tmp_path / "sft")  # the session's chat model stays as it was
    again = sft(
        SFTConfig(**{**cfg.__dict__, "max_steps": 160}),
        trained["pre"],
        trained["data"],
        trained["tokenizer"],
        tmp_path / "sft",
        resume=True,
    )
    assert again.steps == 160


def test_sft_needs_dialogue_or_a_chat_file(trained, tmp_path):
    with pytest.raises(InputError, match="no dialogue found"):
        sft(sft_cfg(None), trained["pre"], trained["data"], trained["tokenizer"], tmp_path / "sft")
    tok = load_tokenizer(trained["tokenizer"])
    assert add_chat_tokens(tok) == add_chat_tokens(tok)  # adding twice changes nothing


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_parameter_efficient_sft_trains_a_fraction_and_still_learns(method, chat_run, trained, tmp_path):
    cfg = SFTConfig(**{**chat_run["cfg"].__dict__, "method": method, "lr": 1e-2, "min_lr": 1e-3})
    result = sft(cfg, trained["pre"], trained["data"], trained["tokenizer"], tmp_path / "sft")
    _model, meta = load_lm(result.best_dir)  # adapters rebuilt, LoRA merged: a plain GPT forward
    assert meta["peft"]["method"] == method and meta["trainable_fraction"] < 0.5
    report = evaluate_sft(
        cfg, tmp_path / "sft", trained["pre"], trained["data"], trained["tokenizer"], tmp_path / "eval"
    )
    assert report.tuned["response_bpb"] < report.base["response_bpb"]


def test_the_history_is_measured_and_each_conversation_kept_for_the_gate(chat_run):
    from gptcore.results import read_doc_scores, read_eval

    report = chat_run["report"]
    history = report.history  # "again?" is answered right only with the first exchange in view
    assert history["conversations"] >= 2
    assert history["full_history_bpb"] < history["last_turn_only_bpb"] and history["gain_ci"][0] > 0
    kept = read_eval(report.metrics_path)["test"]["documents"]
    scores = read_doc_scores(Path(report.metrics_path).parent / kept["file"])
    assert len(scores.doc_ids) == report.conversations and len(kept["examples_digest"]) == 64
    assert scores.nats.sum() / np.log(2) / scores.bytes.sum() == pytest.approx(report.tuned["response_bpb"])
