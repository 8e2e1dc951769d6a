"""ONNX Runtime's CUDA provider, where there is a GPU (skipped, saying why, elsewhere): every
variant loads, keeps its parity with PyTorch, decodes with its cache on the device, and the engine
and chat paths answer as they do on the CPU."""

import numpy as np
import pytest
import torch

from gptcore.results import load_pretrained
from gptcore.runtime import load_model
from gptcore.runtime.batching import DecodeBatch, Sequence
from gptcore.runtime.engine import Engine, EngineLimits
from gptcore.weights import load_lm

pytestmark = pytest.mark.gpu

# The largest |logit| difference from PyTorch fp32 a variant may show on the CUDA provider (the
# tiny model's logits are of order 10: fp16 rounds them to about 1e-2).
TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}


@pytest.fixture(scope="module")
def torch_lm(trained):
    gpt, _ = load_lm(load_pretrained(trained["pre"]).best_dir)
    return gpt.eval()


def prompt_ids(lm) -> list[int]:
    return lm.encode("wave salt ship sail tide anchor")


def test_every_variant_loads_on_the_cuda_provider(lm_package):
    variants = load_model(lm_package.package_dir, device="cpu").package.variants
    assert {"fp32", "fp16"} <= set(variants)
    for variant in variants:
        lm = load_model(lm_package.package_dir, device="cuda", variant=variant)
        assert lm.provider == "CUDAExecutionProvider" and lm.device_type == "cuda", variant
    assert load_model(lm_package.package_dir, device="cuda").variant == "fp16"  # auto on CUDA


@pytest.mark.parametrize("variant", sorted(TOLERANCE))
def test_the_variant_keeps_its_parity_with_torch_on_cuda(lm_package, torch_lm, variant):
    lm = load_model(lm_package.package_dir, device="cuda", variant=variant)
    ids = np.array([prompt_ids(lm) * 4])[:, : lm.block_size]
    with torch.no_grad():
        logits, _ = torch_lm(torch.from_numpy(ids))
    got = lm.forward_logits(ids).astype(np.float32)
    expected = logits[..., : got.shape[-1]].numpy()  # the package's vocabulary: the tokenizer's, not the padded one
    assert np.abs(got - expected).max() < TOLERANCE[variant]
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.95


def test_decoding_keeps_the_cache_on_the_device_and_matches_torch_greedy(lm_package, torch_lm):
    lm = load_model(lm_package.package_dir, device="cuda", variant="fp32")
    prompt = prompt_ids(lm)
    batch = DecodeBatch(lm, max_rows=1)
    batch.start(Sequence(list(prompt), 12, lm.block_size, 0.0, None, None, None, frozenset()))
    batch.fill()
    buffers = [(b.device_name(), b.data_ptr()) for b in batch.cache.buffers]
    tokens = []
    while batch.decoding:
        for seq, token in batch.decode():
            tokens += [] if token is None else [token]
            if seq.finish is not None:
                batch.remove(seq)
        if batch.decoding:  # written in place: the same device buffers at every step, no copy
            assert [(b.device_name(), b.data_ptr()) for b in batch.cache.buffers] == buffers
    assert {name for name, _ in buffers} == {"cuda"}
    with torch.no_grad():
        expected = torch_lm.generate(torch.tensor([prompt]), 12, temperature=0.0)[0, len(prompt) :].tolist()
    assert tokens == expected


def test_the_engine_on_cuda_decodes_a_concurrent_mix_as_each_alone(lm_package):
    lm = load_model(lm_package.package_dir, device="cuda", variant="fp32")
    ids = lm.encode("wave salt ship sail tide anchor harbour gull storm deck hill field plough barn")
    requests = [(ids[i : i + length], n) for i, (length, n) in enumerate([(1, 20), (14, 5), (6, 12), (3, 30)])]
    alone = [lm.generate_ids(p, n, temperature=0.0, stop_at_eos=False) for p, n in requests]
    engine = Engine(lm, EngineLimits(max_running=3, prefill_chunk=4))
    try:
        together = [list(g) for g in [engine.submit(p, n, temperature=0.0, stop_at_eos=False) for p, n in requests]]
    finally:
        engine.close()
    assert together == alone


def test_a_chat_model_answers_on_cuda_as_on_the_cpu(chat_package):
    messages = [{"role": "user", "content": "wave salt"}]
    cpu = load_model(chat_package.package_dir, device="cpu", variant="fp32")
    cuda = load_model(chat_package.package_dir, device="cuda", variant="fp32")
    assert cuda.provider == "CUDAExecutionProvider"
    assert cuda.chat(messages, 8, temperature=0.0) == cpu.chat(messages, 8, temperature=0.0)
