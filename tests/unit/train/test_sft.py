"""Chat SFT on a real (tiny) pretrained GPT: the vocabulary grows safely, training lowers held-out
response bpb against the base model, and the outputs are whole."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from gptcore.config import ModelConfig, SFTConfig
from gptcore.data.chat import END, add_chat_tokens
from gptcore.errors import InputError
from gptcore.eval.chat import evaluate_sft
from gptcore.model import GPT
from gptcore.results import load_sft, load_tokenizer
from gptcore.tracking import Tracking, TrackingSettings
from gptcore.train.sft import sft
from gptcore.weights import load_lm
from tests.conftest import WORDS


def write_chat(path, n: int = 400, seed: int = 0):
    """Prompts of topic words; the reply names the topic and repeats the prompt's first word: learnable."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            topic = rng.choice(sorted(WORDS))
            words = [rng.choice(WORDS[topic]) for _ in range(6)]
            record = (
                {"prompt": " ".join(words), "response": f"{topic}: {words[0]} {words[0]}"}
                if i % 2
                else {
                    "messages": [
                        {"role": "user", "content": " ".join(words)},
                        {"role": "assistant", "content": f"{topic}: {words[0]} {words[0]}"},
                    ]
                }
            )
            f.write(json.dumps(record) + "\n")
    return path


def sft_cfg(data, **overrides) -> SFTConfig:
    return SFTConfig(
        **{
            "data": data and str(data),
            "max_steps": 120,
            "batch_size": 16,
            "lr": 3e-3,
            "min_lr": 3e-4,
            "warmup_steps": 5,
            "eval_interval": 40,
            "eval_batches": 2,
            "log_interval": 40,
            "checkpoint_interval": 120,
            "device": "cpu",
            "val_fraction": 0.1,
            "test_fraction": 0.1,
            "eval_conversations": 60,
            "samples": 2,
            "max_new_tokens": 8,
            **overrides,
        }
    )


def test_grow_vocab_keeps_old_logits_and_grows_past_the_padding():
    torch.manual_seed(0)
    gpt = GPT(ModelConfig(block_size=8, n_layer=1, n_head=2, n_embd=16, vocab_size=62)).eval()
    ids = torch.randint(0, 62, (2, 8))
    before = gpt(ids)[0][..., :62]
    gpt.grow_vocab(70)  # 64 padded rows -> 128
    assert gpt.wte.weight.shape[0] == 128 and gpt.lm_head.weight is gpt.wte.weight and gpt.cfg.vocab_size == 70
    torch.testing.assert_close(gpt(ids)[0][..., :62], before)
    torch.testing.assert_close(gpt.wte.weight[65], gpt.wte.weight[:62].mean(dim=0))


@pytest.fixture(scope="module")
def chat_run(trained, tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    cfg = sft_cfg(write_chat(root / "chat.jsonl"))
    tracking = Tracking(
        TrackingSettings(
            tracking_uri=f"sqlite:///{root}/mlflow.db",
            registry_uri=None,
            artifact_location=str(root / "artifacts"),
            experiment="test",
        )
    )
    result = sft(cfg, trained["pre"], trained["data"], trained["tokenizer"], root / "sft", tracking)
    report = evaluate_sft(
        cfg, root / "sft", trained["pre"], trained["data"], trained["tokenizer"], root / "eval", tracking
    )
    return {"cfg": cfg, "result": result, "report": report, "root": root, "tracking": tracking}


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
    assert model.cfg.vocab_size == tok.get_vocab_size() == base_vocab + 3
    assert meta["sft"]["chat_tokens"][END] == tok.token_to_id(END)
    samples = Path(chat_run["report"].samples_path).read_text(encoding="utf-8")
    assert samples.count("## Prompt") == 2 and "| base | fine-tuned |" in samples
    client = chat_run["tracking"].client()
    runs = {
        r.data.tags["gptcore.stage"]: r
        for r in client.search_runs([client.get_experiment_by_name("test").experiment_id])
    }
    assert runs["sft"].data.metrics["best_val_response_loss"] == pytest.approx(result.best_val_response_loss)
    assert runs["evaluate_sft"].data.metrics["tuned_test_response_bpb"] == pytest.approx(
        chat_run["report"].tuned["response_bpb"]
    )
    artifacts = {a.path for a in client.list_artifacts(runs["evaluate_sft"].info.run_id)}
    assert {"sft_eval.json", "sft_samples.md"} <= artifacts


def test_sft_resumes_from_its_checkpoint(chat_run, trained):
    cfg = chat_run["cfg"]
    again = sft(
        SFTConfig(**{**cfg.__dict__, "max_steps": 160}),
        trained["pre"],
        trained["data"],
        trained["tokenizer"],
        chat_run["root"] / "sft",
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
