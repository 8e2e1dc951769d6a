"""Evaluation of the chat model beside its base: held-out response loss and bits per byte, history, samples.

Each held-out conversation is scored on its own row (no packed neighbours), by the base model
(the pretrained GPT with the chat tokens, SFT's starting point) and by the fine-tuned one.
Response bpb counts the assistant turns' text (its closing `<|end|>` stands for no bytes and is
left out, so both models are measured on the same bytes); response loss is the mean NLL of every
token SFT trains on, `<|end|>` included. The bpb gain comes with a 95% paired bootstrap
interval over conversations. The fine-tuned model's per-conversation figures are kept (with a
digest of the conversations) for the registry's gate, which pairs two chat versions on them.

History: the last answer of every held-out conversation with more than one exchange, scored
after the whole conversation and after its last user turn alone, with a paired interval of the
difference: what the context buys. Samples: the first few held-out prompts, each with a fixed
seed, answered by both models, side by side in markdown.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from gptcore.config import SFTConfig
from gptcore.data.chat import conversations, fit_row, inputs_and_targets, spread
from gptcore.fsutil import atomic_file, write_json
from gptcore.layout import PAD, SFT_DOC_BPB, SFT_EVAL, SFT_SAMPLES
from gptcore.markdown import cell
from gptcore.metrics import bits_per_byte, document_distribution, documents_digest, paired_bpb_bootstrap
from gptcore.model import GPT, sequence_nll
from gptcore.results import (
    DocScores,
    SFTEvalResult,
    load_pretrained,
    load_sft,
    load_tokenizer,
    token_byte_lengths,
    write_doc_scores,
)
from gptcore.runtime.template import END, Conversation, Rendered, add_chat_tokens, prompt_ids, render
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


def last_answer_only(conversation: Conversation, tok, chat_ids: dict[str, int]) -> Rendered:
    """The conversation rendered with loss on its last answer alone."""
    r = render(conversation, tok, chat_ids)
    last = len(render(conversation[-1:], tok, chat_ids).ids)
    return Rendered(r.ids, [False] * (len(r.ids) - last) + r.loss[-last:])


def history_figures(
    model: GPT, held_out: list[Conversation], tok, chat_ids: dict[str, int], byte_lengths, pad_id: int, resamples: int
) -> dict | None:
    """Bits per byte of the last answers of multi-exchange conversations, with and without their history."""
    multi = [c for c in held_out if sum(role == "user" for role, _ in c) > 1]
    if len(multi) < 2:
        return None
    width = model.cfg.block_size + 1
    scored = {}
    for name, renderings in (
        ("full_history", [last_answer_only(c, tok, chat_ids) for c in multi]),
        ("last_turn_only", [last_answer_only(c[-2:], tok, chat_ids) for c in multi]),
    ):
        ids, loss, owner = conversation_rows(renderings, width, pad_id)
        scored[name] = score_responses(model, ids, loss, owner, byte_lengths, chat_ids[END])
    full, last = scored["full_history"], scored["last_turn_only"]
    paired = paired_bpb_bootstrap(last.nats, full.nats, full.n_bytes, resamples=resamples)
    return {
        "conversations": len(multi),
        "full_history_bpb": full.bpb,
        "last_turn_only_bpb": last.bpb,
        "gain": paired["reduction"]["delta"],
        "gain_ci": paired["reduction"]["ci"],
    }


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
            f"| {cell(base)} | {cell(tuned)} |\n",
        ]
    return "\n".join(lines)


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
    out_dir = Path(out_dir)
    doc_ids = [str(i) for i in range(len(held_out))]
    tuned_docs = DocScores(
        np.asarray(doc_ids), scores["tuned"].nats, loss[:, 1:].sum(axis=1), scores["tuned"].n_bytes.astype(np.int64)
    )
    write_doc_scores(out_dir / SFT_DOC_BPB, tuned_docs)
    test = figures["tuned"] | {
        "documents": document_distribution(tuned_docs)
        | {"file": SFT_DOC_BPB, "examples_digest": documents_digest(doc_ids, [json.dumps(c) for c in held_out])}
    }
    history = history_figures(tuned, held_out, tok, chat_ids, byte_lengths, tok.token_to_id(PAD), 1000)
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
    result = SFTEvalResult(
        str(out_dir / SFT_EVAL),
        str(out_dir / SFT_SAMPLES),
        len(held_out),
        figures["base"],
        figures["tuned"],
        gain,
        ci,
        test,
        history,
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
    if history is not None:
        log.info(
            "evaluate: last answers of %d multi-turn conversations: %.4f bits/byte with the history vs %.4f "
            "after the last user turn alone (gain %.4f, 95%% CI %.4f to %.4f)",
            history["conversations"],
            history["full_history_bpb"],
            history["last_turn_only_bpb"],
            history["gain"],
            *history["gain_ci"],
        )
    with stage_run(tracking, "evaluate_sft", tags={"gptcore.data_digest": meta["data_digest"]}) as run:
        run.log_metrics(
            {f"test/{name}_{k}": v for name, f in figures.items() for k, v in f.items()}
            | {
                "test/response_bpb_gain": gain,
                "test/response_bpb_gain_ci_low": ci[0],
                "test/response_bpb_gain_ci_high": ci[1],
            }
            | ({f"history/{k}": v for k, v in history.items() if k != "gain_ci"} if history else {})
        )
        run.log_artifact(result.metrics_path)
        run.log_artifact(result.samples_path)
    return result
