"""Evaluation of the chat model beside its base: held-out response loss and bits per byte, samples.

Each held-out conversation is scored on its own row (no packed neighbours), by the base model
(the pretrained GPT with the chat tokens, SFT's starting point) and by the fine-tuned one.
Response bpb counts the assistant turns' text (its closing `<|end|>` stands for no bytes and is
left out, so both models are measured on the same bytes); response loss is the mean NLL of every
token SFT trains on, `<|end|>` included. The bpb gain comes with a 95% paired bootstrap
interval over conversations. Samples: the first few held-out prompts, each with a fixed seed,
answered by both models, side by side in markdown.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from gptcore.config import SFTConfig
from gptcore.data.chat import (
    END,
    Conversation,
    add_chat_tokens,
    conversations,
    fit_row,
    inputs_and_targets,
    prompt_ids,
    render,
    spread,
)
from gptcore.fsutil import atomic_file, write_json
from gptcore.layout import PAD, SFT_EVAL, SFT_SAMPLES
from gptcore.metrics import bits_per_byte, paired_bpb_bootstrap
from gptcore.model import GPT, sequence_nll
from gptcore.results import SFTEvalResult, load_pretrained, load_sft, load_tokenizer, token_byte_lengths
from gptcore.tracking import Tracking, stage_run
from gptcore.weights import load_lm, pick_device

log = logging.getLogger("gptcore.sft")


def conversation_rows(renderings, width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row per conversation: ids, loss flags (N, width), and the row each loss target belongs to."""
    ids = np.full((len(renderings), width), pad_id, dtype=np.int64)
    loss = np.zeros((len(renderings), width), dtype=bool)
    for i, r in enumerate(renderings):
        r, _ = fit_row(r, width)
        ids[i, : len(r.ids)] = r.ids
        loss[i, : len(r.loss)] = r.loss
    owner = np.repeat(np.arange(len(renderings)), loss[:, 1:].sum(axis=1))
    return ids, loss, owner


@dataclass
class ResponseScores:
    nats: np.ndarray  # (N,) summed NLL of each conversation's response text
    n_bytes: np.ndarray  # (N,) bytes of that text
    loss: float  # mean NLL over every trained token, <|end|> included

    @property
    def bpb(self) -> float:
        return bits_per_byte(float(self.nats.sum()), int(self.n_bytes.sum()))


def score_responses(
    model: GPT, ids: np.ndarray, loss: np.ndarray, owner: np.ndarray, byte_lengths: np.ndarray, end_id: int
) -> ResponseScores:
    inputs, targets = inputs_and_targets(ids, loss)
    trained = loss[:, 1:]
    nats, targets = sequence_nll(model, inputs, targets)[trained], targets[trained]  # row by row, as `owner` counts
    text = targets != end_id
    n = len(ids)
    return ResponseScores(
        np.bincount(owner[text], weights=nats[text], minlength=n),
        np.bincount(owner[text], weights=byte_lengths[targets[text]], minlength=n),
        float(nats.mean()),
    )


def answer(model: GPT, tok, prompt: list[int], cfg: SFTConfig, seed: int, end_id: int) -> str:
    """A sampled reply to `prompt` (ids ending in <|assistant|>), up to <|end|>."""
    device = next(model.parameters()).device
    prompt = prompt[-(model.cfg.block_size - 1) :]
    generator = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(
        torch.tensor([prompt], device=device), cfg.max_new_tokens, cfg.temperature, cfg.top_k, generator
    )[0, len(prompt) :].tolist()
    return tok.decode(out[: out.index(end_id)] if end_id in out else out, skip_special_tokens=True)


def samples_markdown(pairs: list[tuple[Conversation, str, str]], cfg: SFTConfig) -> str:
    lines = [
        f"# Chat samples: base vs fine-tuned\n\nTemperature {cfg.temperature}, top-k {cfg.top_k}, "
        f"seed {cfg.seed} + i, at most {cfg.max_new_tokens} new tokens; held-out prompts.\n"
    ]
    for i, (conversation, base, tuned) in enumerate(pairs):
        quote = "\n".join(f"> {line}" for line in conversation[-2][1].splitlines())
        reference = "\n".join(f"> {line}" for line in conversation[-1][1].splitlines())
        lines += [
            f"## Prompt {i + 1}\n\n{quote}\n",
            f"**Reference reply**\n\n{reference}\n",
            "| base | fine-tuned |",
            "|---|---|",
            f"| {_cell(base)} | {_cell(tuned)} |\n",
        ]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>") or "*(nothing)*"


def evaluate_sft(
    cfg: SFTConfig,
    sft_dir: str | Path,
    pretrained_dir: str | Path,
    data_dir: str | Path,
    tokenized_dir: str | Path,
    out_dir: str | Path,
    tracking: Tracking | None = None,
) -> SFTEvalResult:
    """Response loss and bpb of the base and the fine-tuned chat model on held-out conversations, and samples."""
    device = pick_device("auto")
    tok = load_tokenizer(tokenized_dir)
    chat_ids = add_chat_tokens(tok)
    base, _ = load_lm(load_pretrained(pretrained_dir).best_dir, vocab_size=tok.get_vocab_size())  # SFT's start
    tuned, meta = load_lm(load_sft(sft_dir).best_dir)
    end_id = chat_ids[END]
    held_out = spread(conversations(cfg, data_dir, "test"), cfg.eval_conversations)
    renderings = [render(c, tok, chat_ids) for c in held_out]
    ids, loss, owner = conversation_rows(renderings, tuned.cfg.block_size + 1, tok.token_to_id(PAD))
    byte_lengths = token_byte_lengths(tok)
    scores = {}
    for name, model in (("base", base), ("tuned", tuned)):
        model.to(device).eval()
        scores[name] = score_responses(model, ids, loss, owner, byte_lengths, end_id)
    figures = {name: {"response_loss": s.loss, "response_bpb": s.bpb} for name, s in scores.items()}
    gain = figures["base"]["response_bpb"] - figures["tuned"]["response_bpb"]
    ci = paired_bpb_bootstrap(scores["base"].nats, scores["tuned"].nats, scores["tuned"].n_bytes)["reduction"]["ci"]
    pairs = []
    for i, conversation in enumerate(spread(held_out, cfg.samples)):
        prompt = prompt_ids(conversation, tok, chat_ids)
        pairs.append(
            (
                conversation,
                answer(base, tok, prompt, cfg, cfg.seed + i, end_id),
                answer(tuned, tok, prompt, cfg, cfg.seed + i, end_id),
            )
        )
    out_dir = Path(out_dir)
    result = SFTEvalResult(
        str(out_dir / SFT_EVAL), str(out_dir / SFT_SAMPLES), len(held_out), figures["base"], figures["tuned"], gain, ci
    )
    write_json(result.metrics_path, asdict(result))
    with atomic_file(result.samples_path) as tmp:
        tmp.write_text(samples_markdown(pairs, cfg), encoding="utf-8")
    log.info(
        "evaluate: chat responses of %d held-out conversations: %.4f bits/byte fine-tuned vs %.4f base "
        "(gain %.4f, 95%% CI %.4f to %.4f); response loss %.4f vs %.4f",
        len(held_out),
        figures["tuned"]["response_bpb"],
        figures["base"]["response_bpb"],
        gain,
        ci[0],
        ci[1],
        figures["tuned"]["response_loss"],
        figures["base"]["response_loss"],
    )
    with stage_run(tracking, "evaluate_sft", tags={"gptcore.data_digest": meta["data_digest"]}) as run:
        run.log_metrics(
            {f"{name}_test_{k}": v for name, f in figures.items() for k, v in f.items()}
            | {
                "test_response_bpb_gain": gain,
                "test_response_bpb_gain_ci_low": ci[0],
                "test_response_bpb_gain_ci_high": ci[1],
            }
        )
        run.log_artifact(result.metrics_path)
        run.log_artifact(result.samples_path)
    return result
