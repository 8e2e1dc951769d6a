"""Per-token attributions for the classifier: integrated gradients over the token embeddings.

For a passage with token embeddings e (T, C), a baseline b and a class k, the attribution of token t is
    (e_t - b_t) · ∫₀¹ ∂f_k(b + α(e - b)) / ∂e_t dα
with f_k the class-k logit (Sundararajan et al., 2017). The integral is the trapezoid rule over
`steps` intervals, refined where they are too coarse. Its end points are the baseline and the
input themselves, so the completeness check (attributions summing to f_k(e) - f_k(b)) costs no
extra forward pass; the points of every passage run as rows of shared batches.

Evaluation writes OUT/attributions.html for a fixed sample of test passages; `gptcore explain`
explains one text with the torch checkpoint a registered classifier version keeps (the
registry stores it under the version's CHECKPOINT_TAG; `load_version_checkpoint` reads it).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from gptcore.data.passages import Passages
from gptcore.errors import ConfigError, InputError
from gptcore.eval.explanation import Explanation, write_html
from gptcore.fsutil import sha256_file
from gptcore.layout import CHECKPOINT_TAG, PAD, TOKENIZER_FILE
from gptcore.model import GPTClassifier, pad_right
from gptcore.results import load_tokenizer
from gptcore.runtime.package import model_version
from gptcore.weights import load_classifier

log = logging.getLogger("gptcore.explain")

STEPS, REFINE = 32, 64
# Evaluation explains a few passages with fewer steps: it runs on every pipeline, often on CPU;
# refinement still adds points where the path needs them, and the page shows each passage's gap.
EVAL_PASSAGES, EVAL_STEPS = 12, 16


@contextlib.contextmanager
def token_embeddings(model: GPTClassifier, embeds: torch.Tensor):
    """Inside the block the token embedding layer returns `embeds` (B, T, C) whatever the ids, so
    the classifier's own forward (positions, blocks, pooling) runs unchanged on them."""
    handle = model.gpt.wte.register_forward_hook(lambda module, args, output: embeds)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class PathIntegrals:
    attributions: torch.Tensor  # (N, T) per token, zero past each passage's end
    logits: torch.Tensor  # (N, K) on the inputs
    baseline_logits: torch.Tensor  # (N, K) on the baselines
    targets: torch.Tensor  # (N,) the class explained
    points: torch.Tensor  # (N,) points of the path evaluated


def integrated_gradients(
    model: GPTClassifier,
    seqs: list[list[int]],
    pad_id: int,
    targets: torch.Tensor | None = None,
    steps: int = STEPS,
    refine: int = REFINE,
    batch_size: int = 64,
) -> PathIntegrals:
    """Attributions of every passage (token id lists) towards `targets`, by default the predicted classes.

    The path starts as `steps` equal intervals. A small model's logit can jump across a narrow
    stretch of it, which equal steps miss: while the attributions miss the logit difference by
    more than 1% of it (or 0.01), the intervals over which the logit moves more than the
    trapezoid of their end gradients says are halved, up to `refine` more points per passage.
    """
    if steps < 1 or refine < 0:
        raise ConfigError(f"explain: need steps >= 1 and refine >= 0, got steps={steps}, refine={refine}")
    if not seqs or not all(1 <= len(s) <= model.gpt.cfg.block_size for s in seqs):
        raise InputError(
            f"explain: every passage needs 1 to block_size={model.gpt.cfg.block_size} tokens, "
            f"got lengths {sorted({len(s) for s in seqs})}"
        )
    model.eval()  # dropout would make the path integral noise
    device = next(model.parameters()).device
    ids, mask = (t.to(device) for t in pad_right(seqs, pad_id))  # (N, T) each
    with torch.no_grad():
        x = model.gpt.wte(ids)  # (N, T, C)
        targets = model(ids, mask).argmax(dim=-1) if targets is None else targets.to(device)  # (N,)
    # Baseline: the zero vector at every position, i.e. the same passage with no token content
    # (positions still apply). Not the PAD embedding: PAD never reaches a pooled position in
    # training, so its row is an arbitrary point (at most trained as a wrong answer of the tied
    # LM head) rather than "no token". A model may still classify the baseline confidently; the
    # explanation reports what it predicts there, since attributions explain the move from it.
    baseline = torch.zeros_like(x)
    points: list[dict[float, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in seqs]  # alpha -> logits, rates

    def evaluate(todo: list[tuple[int, float]]) -> None:
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            n = torch.tensor([row for row, _ in chunk], device=device)  # (R,)
            alpha = torch.tensor([a for _, a in chunk], device=device)[:, None, None]  # (R, 1, 1)
            delta = x[n] - baseline[n]  # (R, T, C)
            e = (baseline[n] + alpha * delta).requires_grad_()
            with torch.enable_grad(), token_embeddings(model, e):
                out = model(ids[n], mask[n])  # (R, K)
                # Rows do not interact, so one backward of the summed logits gives every row's gradient.
                (grad,) = torch.autograd.grad(out.gather(1, targets[n, None]).sum(), e)
            rates = ((grad * delta).sum(dim=-1) * mask[n]).double().cpu()  # (R, T): d logit / d alpha per token
            for r, (row, a) in enumerate(chunk):
                points[row][a] = (out[r].detach().double().cpu(), rates[r])

    def unresolved(row: int) -> list[tuple[float, int, float]]:  # (error, row, midpoint) of each loose interval
        alphas = sorted(points[row])
        f = [float(points[row][a][0][targets[row]]) for a in alphas]
        rate = [float(points[row][a][1].sum()) for a in alphas]
        tol = 0.01 * max(abs(f[-1] - f[0]), 1.0)
        errors = [
            (f1 - f0 - (a1 - a0) * (r0 + r1) / 2, a0, a1)  # the logit's move minus the trapezoid's
            for a0, a1, f0, f1, r0, r1 in zip(alphas, alphas[1:], f, f[1:], rate, rate[1:])
        ]
        if abs(sum(err for err, _, _ in errors)) <= tol:  # the completeness gap
            return []
        worst = max(abs(err) for err, _, _ in errors)  # a jump dominates: spend the points on it first
        return [(abs(err), row, (a0 + a1) / 2) for err, a0, a1 in errors if abs(err) > max(tol * (a1 - a0), worst / 4)]

    evaluate([(row, k / steps) for row in range(len(seqs)) for k in range(steps + 1)])
    spent = [0] * len(seqs)
    while True:
        todo = []
        for row in range(len(seqs)):
            loose = sorted(unresolved(row), reverse=True)[: refine - spent[row]]  # worst first
            spent[row] += len(loose)
            todo += [(row, a) for _, _, a in loose]
        if not todo:
            break
        evaluate(todo)
    attributions = torch.zeros(ids.shape, dtype=torch.float64)  # (N, T)
    for row, found in enumerate(points):
        alphas = sorted(found)
        widths = torch.tensor(alphas[1:], dtype=torch.float64) - torch.tensor(alphas[:-1], dtype=torch.float64)
        weights = torch.zeros(len(alphas), dtype=torch.float64)  # trapezoid rule on the points found
        weights[:-1] += widths / 2
        weights[1:] += widths / 2
        attributions[row] = weights @ torch.stack([found[a][1] for a in alphas])
    return PathIntegrals(
        attributions,
        torch.stack([p[1.0][0] for p in points]),
        torch.stack([p[0.0][0] for p in points]),
        targets.cpu(),
        torch.tensor([len(p) for p in points]),
    )


def explain_passages(
    model: GPTClassifier,
    tok,
    seqs: list[list[int]],
    classes: list[str],
    labels: np.ndarray | None = None,
    doc_ids: list[str] | None = None,
    steps: int = STEPS,
    refine: int = REFINE,
) -> list[Explanation]:
    """Integrated-gradients attributions towards the predicted class of every passage (token id lists)."""
    ig = integrated_gradients(model, seqs, tok.token_to_id(PAD), steps=steps, refine=refine)
    probs, baseline_probs = F.softmax(ig.logits, dim=-1).numpy(), F.softmax(ig.baseline_logits, dim=-1).numpy()
    return [
        Explanation(
            tokens=[tok.decode([i], skip_special_tokens=False) for i in s],
            attributions=ig.attributions[n, : len(s)].numpy(),
            probs=probs[n],
            baseline_probs=baseline_probs[n],
            classes=list(classes),
            target=int(t),
            logit=float(ig.logits[n, t]),
            baseline_logit=float(ig.baseline_logits[n, t]),
            points=int(ig.points[n]),
            label=None if labels is None else int(labels[n]),
            doc_id=None if doc_ids is None else doc_ids[n],
        )
        for n, (s, t) in enumerate(zip(seqs, ig.targets))
    ]


def class_sample(labels: np.ndarray, n: int) -> np.ndarray:
    """Indices of at most `n` passages, as even over the classes as their counts allow and spread
    evenly within each class: the same passages every run."""
    members = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    quota = [0] * len(members)
    while sum(quota) < min(n, len(labels)):
        for c, m in enumerate(members):
            if quota[c] < len(m) and sum(quota) < n:
                quota[c] += 1
    return np.concatenate([m[np.linspace(0, len(m) - 1, num=q).astype(np.int64)] for m, q in zip(members, quota)])


def explain_sample(
    model: GPTClassifier,
    tok,
    passages: Passages,
    classes: list[str],
    path: str | Path,
    n: int = EVAL_PASSAGES,
    steps: int = EVAL_STEPS,
) -> list[Explanation]:
    """Explain a fixed class-spread sample of `passages` and write the page to `path`."""
    picks = class_sample(passages.labels, n)
    explanations = explain_passages(
        model,
        tok,
        [passages.ids[i] for i in picks],
        classes,
        passages.labels[picks],
        [passages.doc_ids[i] for i in picks],
        steps,
    )
    write_html(path, explanations, f"Integrated gradients on {len(picks)} test passages")
    return explanations


def explain(
    model_uri: str,
    text: str,
    tracking_uri: str | None = None,
    registry_uri: str | None = None,
    steps: int = STEPS,
    html_path: str | Path | None = None,
    tokenizer: str | Path | None = None,
) -> Explanation:
    """Attributions for one text by the classifier checkpoint behind `model_uri` (models:/NAME@ALIAS,
    models:/NAME/VERSION or a checkpoint directory; `tokenizer` for a directory without one)."""
    if not text.strip():
        raise InputError("explain: the text is empty; there is nothing to attribute")
    model, meta, tok = load_version_checkpoint(model_uri, tracking_uri, registry_uri, tokenizer)
    ids = tok.encode(text, add_special_tokens=False).ids
    block_size = model.gpt.cfg.block_size
    if len(ids) > block_size:  # as the served model does
        log.warning("explain: the text is %d tokens; the model reads the first %d", len(ids), block_size)
    (explanation,) = explain_passages(model, tok, [ids[:block_size]], meta["labels"], steps=steps)
    if html_path is not None:
        log.info("explain: wrote %s", write_html(html_path, [explanation], f"Integrated gradients: {model_uri}"))
    return explanation


def load_version_checkpoint(
    uri: str | Path,
    tracking_uri: str | None = None,
    registry_uri: str | None = None,
    tokenizer: str | Path | None = None,
) -> tuple[GPTClassifier, dict[str, Any], Any]:
    """(classifier, model.json, tokenizer) from the torch checkpoint behind a registered version
    (`models:/NAME@ALIAS`, `models:/NAME/VERSION`) or in a local checkpoint directory.

    Weights load from safetensors only. A registered checkpoint carries its tokenizer; a directory
    without tokenizer.json takes `tokenizer` (a tokenizer.json), checked against the model's digest.
    """
    uri = str(uri)
    if not uri.startswith("models:/"):
        return _load_checkpoint_dir(Path(uri), tokenizer)
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri or tracking_uri)
    try:
        version = model_version(client, uri)
        what = f"{uri}: version {version.version} of {version.name!r}"
        if (kind := version.tags.get("gptcore.kind")) != "classifier":
            raise InputError(f"{what} is a {kind!r} model; explanations need a classifier")
        if (artifact := version.tags.get(CHECKPOINT_TAG)) is None:
            raise InputError(
                f"{what} has no torch checkpoint (tag {CHECKPOINT_TAG} missing: registered before "
                "checkpoints were kept, or its checkpoint was gone); register the classifier again"
            )
        with tempfile.TemporaryDirectory() as tmp:  # loaded into memory, so the download can go
            return _load_checkpoint_dir(
                Path(
                    download_artifacts(
                        run_id=version.run_id, artifact_path=artifact, dst_path=tmp, tracking_uri=tracking_uri
                    )
                ),
                None,
            )
    except MlflowException as e:
        raise InputError(f"{uri}: cannot be resolved: {e.message}") from None


def _load_checkpoint_dir(directory: Path, tokenizer: str | Path | None) -> tuple[GPTClassifier, dict[str, Any], Any]:
    if not directory.is_dir():
        raise InputError(
            f"{directory}: no such checkpoint directory (or use models:/NAME@ALIAS or models:/NAME/VERSION)"
        )
    model, meta = load_classifier(directory)
    path = directory / TOKENIZER_FILE if (directory / TOKENIZER_FILE).is_file() else tokenizer
    if path is None or not Path(path).is_file():
        raise InputError(f"{directory}: no tokenizer.json here, and no tokenizer given ({path})")
    if sha256_file(path) != meta["tokenizer_digest"]:
        raise InputError(f"{path}: not the tokenizer {directory} was trained with (its digest differs)")
    return model, meta, load_tokenizer(path)
