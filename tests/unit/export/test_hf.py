"""`export --format hf`: the GPT and its tokenizer as a transformers GPT-2 checkpoint that computes
the same logits and ids as gptcore, and a refusal naming each option GPT-2 cannot express."""

import json
from dataclasses import asdict

import pytest
import torch

from gptcore.cli import main
from gptcore.config import ModelConfig, PeftConfig
from gptcore.errors import ConfigError
from gptcore.export.hf import export_hf, write_hf_tokenizer_files
from gptcore.layout import EOT, PAD, TOKENIZER_FILE, Workdir
from gptcore.model import GPT
from gptcore.peft import apply_peft
from gptcore.results import load_pretrained, load_tokenizer
from gptcore.runtime.template import END, add_chat_tokens, prompt_ids, render
from gptcore.weights import load_lm, save_weights, tied_aliases, without_aliases

transformers = pytest.importorskip(
    "transformers", reason="the Hugging Face interop tests need transformers (the dev extra: pip install -e .[dev])"
)

CONVERSATION = [
    ("system", "Speak as Hamlet."),
    ("user", "To be, or not to be?"),
    ("assistant", "That is the question:\nwhether 'tis nobler in the mind to suffer"),
    ("user", "The slings and arrows — of outrageous fortune?"),
]
MESSAGES = [{"role": role, "content": content} for role, content in CONVERSATION]


def save_lm(gpt: GPT, out_dir, peft: dict | None = None):
    """A GPT as a checkpoint directory that `load_lm` reads."""
    meta = {"kind": "lm", "model": asdict(gpt.cfg), **({"peft": peft} if peft else {})}
    return save_weights(without_aliases(gpt.state_dict(), tied_aliases(gpt)), out_dir, meta)


def assert_same_logits(model_dir, hf_dir):
    """gptcore's and transformers' fp32 logits on a batch of ids agree, over the tokenizer's ids (not the
    padding); the transformers model."""
    gpt, _ = load_lm(model_dir)
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    V = gpt.cfg.vocab_size
    ids = torch.randint(0, V, (3, gpt.cfg.block_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = gpt(ids)[0][..., :V]
        got = hf(ids).logits
    assert got.shape == want.shape == (3, gpt.cfg.block_size, V)
    assert (got - want).abs().max().item() <= 1e-4
    return hf


@pytest.fixture(scope="module")
def hf_lm(trained, tmp_path_factory):
    """The tiny pretrained GPT exported as a transformers checkpoint."""
    best = load_pretrained(trained["pre"]).best_dir
    return export_hf(best, trained["tokenizer"] / TOKENIZER_FILE, tmp_path_factory.mktemp("hf") / "lm", chat=False)


def test_exported_lm_computes_gptcore_logits(trained, hf_lm):
    assert sorted(p.name for p in hf_lm.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    hf = assert_same_logits(load_pretrained(trained["pre"]).best_dir, hf_lm)
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied, as gptcore's


def test_untied_head_and_no_biases_map(trained, tmp_path):
    tok = load_tokenizer(trained["tokenizer"])
    cfg = ModelConfig(
        block_size=16, n_layer=1, n_head=2, n_embd=16, vocab_size=tok.get_vocab_size(), tie_embeddings=False, bias=False
    )
    torch.manual_seed(0)
    model_dir = save_lm(GPT(cfg), tmp_path / "ckpt")  # the untied head's random rows differ from the embedding's
    hf_dir = export_hf(model_dir, trained["tokenizer"] / TOKENIZER_FILE, tmp_path / "hf", chat=False)
    assert json.loads((hf_dir / "config.json").read_text())["tie_word_embeddings"] is False
    hf = assert_same_logits(model_dir, hf_dir)
    assert hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr()  # transformers keeps them apart


def test_tokenizer_gives_gptcore_ids(trained, hf_lm):
    tok = load_tokenizer(trained["tokenizer"])
    hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(hf_lm)
    text = "ROMEO.  But soft, what light through yonder window breaks?\n\tIt is the east — and Juliet, the sun! 42"
    assert hf_tok(text)["input_ids"] == tok.encode(text).ids
    assert hf_tok.decode(tok.encode(text).ids) == text
    assert (hf_tok.eos_token, hf_tok.bos_token, hf_tok.pad_token) == (EOT, EOT, PAD)
    assert hf_tok.pad_token_id == tok.token_to_id(PAD) and hf_tok.model_max_length == 32


def chat_tokenizer(trained, tmp_path):
    """The tokenizer with the chat template's tokens, saved as SFT saves it; it and their ids."""
    tok = load_tokenizer(trained["tokenizer"])
    chat_ids = add_chat_tokens(tok)
    tok.save(str(tmp_path / TOKENIZER_FILE))
    return tok, chat_ids


def test_chat_template_gives_gptcore_ids(trained, tmp_path):
    tok, chat_ids = chat_tokenizer(trained, tmp_path)
    out = tmp_path / "hf"
    out.mkdir()
    write_hf_tokenizer_files(tmp_path / TOKENIZER_FILE, out, 32, chat=True)
    hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(out)
    prompt = hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert prompt["input_ids"] == prompt_ids(CONVERSATION, tok, chat_ids)
    whole = hf_tok.apply_chat_template(MESSAGES, tokenize=True, return_dict=True)
    assert whole["input_ids"] == render(CONVERSATION, tok, chat_ids).ids


def test_chat_model_exports_with_its_template_and_stop_token(trained, tmp_path):
    tok, chat_ids = chat_tokenizer(trained, tmp_path)
    gpt, _ = load_lm(load_pretrained(trained["pre"]).best_dir, vocab_size=tok.get_vocab_size())
    model_dir = save_lm(gpt, tmp_path / "chat")  # the vocabulary grown by the chat tokens, as SFT leaves it
    hf_dir = export_hf(model_dir, tmp_path / TOKENIZER_FILE, tmp_path / "hf", chat=True)
    assert_same_logits(model_dir, hf_dir)
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [chat_ids[END], tok.token_to_id(EOT)]
    hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(hf_dir)
    prompt = hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert prompt["input_ids"] == prompt_ids(CONVERSATION, tok, chat_ids)


@pytest.mark.parametrize(
    ("options", "peft", "named"),
    [
        (
            {"position": "rope", "norm": "rmsnorm", "qk_norm": True, "mlp": "relu2"},
            None,
            ["model.position='rope'", "model.norm='rmsnorm'", "model.qk_norm=True", "model.mlp='relu2'"],
        ),
        ({"mlp": "swiglu"}, None, ["model.mlp='swiglu'"]),
        ({}, PeftConfig(method="adapter", adapter_size=4), ["peft.method='adapter'"]),
    ],
)
def test_options_gpt2_cannot_express_are_refused_by_name(trained, tmp_path, options, peft, named):
    tok = load_tokenizer(trained["tokenizer"])
    gpt = GPT(ModelConfig(block_size=16, n_layer=1, n_head=2, n_embd=16, vocab_size=tok.get_vocab_size(), **options))
    model_dir = save_lm(gpt, tmp_path / "ckpt", apply_peft(gpt, peft) if peft else None)
    with pytest.raises(ConfigError) as refused:
        export_hf(model_dir, trained["tokenizer"] / TOKENIZER_FILE, tmp_path / "hf", chat=False)
    assert all(option in str(refused.value) for option in named)
    assert not (tmp_path / "hf").exists()


@pytest.mark.usefixtures("restore_gptcore_logger")  # main() sets up console logging
def test_cli_exports_the_lm_and_no_chat_model_without_sft(trained, tmp_path, capsys):
    work = tmp_path / "w"
    work.mkdir()
    (work / "pretrain").symlink_to(trained["pre"])
    (work / "tokenizer").symlink_to(trained["tokenizer"])
    assert main(["export", "--format", "hf", "--workdir", str(work), "--no-tracking"]) == 0
    written = json.loads(capsys.readouterr().out)
    assert written == {"lm": str(Workdir(work).export("hf-lm")), "chat": None}
    assert transformers.GPT2LMHeadModel.from_pretrained(written["lm"]).config.n_positions == 32
    assert main(["export", "--format", "hf", "--only", "classifier", "--workdir", str(work), "--no-tracking"]) == 2
    assert "classifier exports to onnx" in capsys.readouterr().err
