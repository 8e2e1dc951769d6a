"""A newly registered chat version beside the champion it challenged, answering the same held-out conversations.

What a person reads before trusting a promotion: a few held-out conversations (their last user
turn, the reference answer) answered by the new version and by the previous champion, through
ONNX Runtime as serving answers them, with one seed per conversation. Markdown, for the pipeline
summary and a Prefect artifact.
"""

from __future__ import annotations

from gptcore.config import SFTConfig
from gptcore.data.chat import conversations, spread
from gptcore.markdown import cell
from gptcore.registry.register import RegisterResult
from gptcore.runtime import load_model
from gptcore.runtime.template import Conversation

SAMPLES = 3


def fitting(model, candidates: list[Conversation], max_new_tokens: int) -> list[Conversation]:
    """Up to SAMPLES of the candidates whose last user turn fits the model's context with room for the answer."""
    fit = []
    for conversation in candidates:
        try:
            model.prompt([{"role": r, "content": t} for r, t in conversation[:-1]], max_new_tokens)
        except ValueError:
            continue
        fit.append(conversation)
    return spread(fit, SAMPLES)


def reply(model, messages: list[dict], cfg: SFTConfig, seed: int) -> str:
    try:
        return model.chat(messages, cfg.max_new_tokens, cfg.temperature, cfg.top_k, seed=seed)
    except ValueError as e:  # the conversation does not fit this version's context
        return f"*({e})*"


def chat_versions_markdown(
    registered: RegisterResult,
    cfg: SFTConfig,
    data_dir: str,
    tracking_uri: str | None = None,
    registry_uri: str | None = None,
) -> str:
    """Held-out conversations answered by `registered`'s version and the champion it was registered against."""
    uris = {f"v{registered.version} (new)": f"models:/{registered.name}/{registered.version}"}
    if registered.previous_champion_version not in (None, registered.version):
        uris[f"v{registered.previous_champion_version} (champion)"] = (
            f"models:/{registered.name}/{registered.previous_champion_version}"
        )
    models = {name: load_model(uri, tracking_uri=tracking_uri, registry_uri=registry_uri) for name, uri in uris.items()}
    new = next(iter(models.values()))
    held_out = fitting(new, spread(conversations(cfg, data_dir, "test"), 20 * SAMPLES), cfg.max_new_tokens)
    lines = [
        f"# {registered.name}: v{registered.version} beside the champion\n",
        f"{registered.reason}. Held-out conversations, temperature {cfg.temperature}, top-k {cfg.top_k}, seed "
        f"{cfg.seed} + i, at most {cfg.max_new_tokens} new tokens.\n",
    ]
    if not held_out:
        lines.append("*(no held-out conversation's last turn fits the context with room for the answer)*")
    for i, conversation in enumerate(held_out):
        messages = [{"role": role, "content": text} for role, text in conversation[:-1]]
        lines += [
            f"## Conversation {i + 1} ({len(messages)} turns before the answer)\n",
            "\n".join(f"> {line}" for line in conversation[-2][1].splitlines()) + "\n",
            "| reference | " + " | ".join(models) + " |",
            "|---" * (len(models) + 1) + "|",
            f"| {cell(conversation[-1][1])} | "
            + " | ".join(cell(reply(m, messages, cfg, cfg.seed + i)) for m in models.values())
            + " |\n",
        ]
    return "\n".join(lines)
