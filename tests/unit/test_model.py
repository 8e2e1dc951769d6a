import numpy as np
import pytest
import torch

from gptcore import metrics
from gptcore.config import ModelConfig
from gptcore.metrics import IGNORE_INDEX
from gptcore.model import GPT, GPTClassifier, sequence_nll, token_nll

CFG = ModelConfig(block_size=16, n_layer=2, n_head=2, n_embd=32, vocab_size=50)


def make_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(CFG).eval()


def test_shapes_and_tied_head():
    gpt = make_gpt()
    logits, loss = gpt(torch.randint(0, 50, (3, 7)), targets=torch.randint(0, 50, (3, 7)))
    assert logits.shape == (3, 7, 64)  # vocab 50 padded to a multiple of 64
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert gpt.lm_head.weight is gpt.wte.weight


def test_one_nll_over_the_tokenizers_vocabulary_in_torch_and_numpy():
    gpt = make_gpt()
    ids = torch.randint(0, 50, (3, 7))
    targets = torch.randint(0, 50, (3, 7))
    targets[0, :3] = IGNORE_INDEX  # e.g. a prompt's tokens: no loss
    logits, loss = gpt(ids, targets=targets)
    logits = logits.detach()
    logits[..., 50:] = 30.0  # the embedding's padding rows: were they in the softmax, they would take the mass
    nll = token_nll(logits, targets, vocab_size=50)
    assert nll.shape == (3, 7) and (nll[0, :3] == 0).all() and (nll[nll != 0] < 10).all()
    np.testing.assert_allclose(metrics.token_nll(logits[..., :50].numpy(), targets.numpy()), nll.numpy(), rtol=1e-5)
    # the training loss is the mean over the targets that carry loss; scoring sees the same figures
    kept = targets != IGNORE_INDEX
    torch.testing.assert_close(loss, token_nll(gpt(ids)[0], targets, 50)[kept].mean())
    scored = sequence_nll(gpt, ids.numpy(), targets.numpy(), batch_size=2)
    np.testing.assert_allclose(scored, token_nll(gpt(ids)[0], targets, 50).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_causal_future_tokens_do_not_change_past_logits():
    gpt = make_gpt()
    ids = torch.randint(0, 50, (1, 10))
    changed = ids.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % 50
    a, _ = gpt(ids)
    b, _ = gpt(changed)
    assert torch.allclose(a[:, :6], b[:, :6], atol=1e-6)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_generate_greedy_is_deterministic_and_slides_past_block_size():
    gpt = make_gpt()
    prompt = torch.randint(0, 50, (1, 4))
    out = gpt.generate(prompt, max_new_tokens=30, temperature=0.0)  # 34 > block_size 16
    assert out.shape == (1, 34)
    assert torch.equal(out[:, :4], prompt)
    assert torch.equal(out, gpt.generate(prompt, max_new_tokens=30, temperature=0.0))


def test_sampling_never_returns_a_padding_id():
    gpt = make_gpt()
    with torch.no_grad():
        gpt.lm_head.weight[50:] = 10.0  # make the padding rows the likeliest by far
    out = gpt.generate(torch.randint(0, 50, (4, 3)), max_new_tokens=20, temperature=1.0)
    assert int(out.max()) < 50


def test_classifier_pools_last_real_token():
    gpt = make_gpt()
    clf = GPTClassifier(gpt, num_classes=3).eval()
    ids = torch.randint(2, 50, (1, 6))
    padded = torch.cat([ids, torch.ones(1, 4, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 6 + [0] * 4])
    a = clf(ids, torch.ones(1, 6, dtype=torch.long))
    b = clf(padded, mask)
    assert a.shape == (1, 3)
    assert torch.allclose(a, b, atol=1e-5)


def test_residual_projections_get_scaled_init():
    gpt = make_gpt()
    std_proj = gpt.blocks[0].attn.proj.weight.std().item()
    std_fc = gpt.blocks[0].mlp.fc.weight.std().item()
    assert std_proj < std_fc * 0.8  # 0.02 / sqrt(2 * n_layer) vs 0.02


OPTIONS = {
    "gpt2": {},
    "rope": {"position": "rope"},
    "rmsnorm": {"norm": "rmsnorm"},
    "qk_norm": {"qk_norm": True},
    "relu2": {"mlp": "relu2"},
    "swiglu": {"mlp": "swiglu"},
    "untied": {"tie_embeddings": False},
    "recipe": {"position": "rope", "norm": "rmsnorm", "qk_norm": True, "mlp": "relu2", "tie_embeddings": False},
}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_cache_and_left_padding_match_the_plain_forward(name):
    """Cached decoding and left padding with a mask give the logits of one plain forward, for every option."""
    import dataclasses

    torch.manual_seed(0)
    gpt = GPT(dataclasses.replace(CFG, **OPTIONS[name])).eval()
    ids = torch.randint(2, 50, (1, 9))
    full, _ = gpt(ids)
    h, past = gpt.hidden_states(ids[:, :5])
    for t in range(5, 9):
        h, past = gpt.hidden_states(ids[:, t : t + 1], position_ids=torch.tensor([[t]]), past=past)
        assert torch.allclose(gpt.lm_head(h)[:, 0], full[:, t], atol=1e-5)
    padded = torch.cat([torch.ones(1, 2, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[0, 0] + [1] * 9])
    got, _ = gpt(padded, position_ids=(mask.cumsum(1) - 1).clamp(min=0), attention_mask=mask)
    assert torch.isfinite(got).all(), "fully padded rows must not produce NaN"
    assert torch.allclose(got[:, 2:], full, atol=1e-5)
    assert (gpt.lm_head.weight is gpt.wte.weight) == OPTIONS[name].get("tie_embeddings", True)


def test_swiglu_keeps_the_parameter_count_close():
    import dataclasses

    gelu = GPT(CFG).num_parameters()
    swiglu = GPT(dataclasses.replace(CFG, mlp="swiglu")).num_parameters()
    assert abs(swiglu - gelu) / gelu < 0.15
