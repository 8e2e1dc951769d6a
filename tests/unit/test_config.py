import pytest

from gptcore.config import (
    FinetuneConfig,
    IngestConfig,
    ModelConfig,
    PipelineConfig,
    TokenizerConfig,
    TrainConfig,
)
from gptcore.errors import ConfigError
from gptcore.presets import GPT2_MODEL, PRESETS, RECOMMENDED_MODEL, check_gpt2, load_config, merge, recommended


@pytest.mark.parametrize("preset", ["default", "default-gpt2", "tiny", "gpu"])
def test_presets_construct_and_load_by_name(preset):
    cfg = PRESETS[preset]()
    assert isinstance(cfg, PipelineConfig)
    assert cfg.finetune.passage_tokens <= cfg.model.block_size
    assert cfg.model.n_embd % cfg.model.n_head == 0
    assert load_config(preset=preset) == cfg


def test_presets_differ_where_they_should():
    assert load_config(preset="tiny").tokenizer.vocab_size == 512
    assert load_config(preset="gpu").model.n_layer == 6
    assert load_config().tokenizer.vocab_size == TokenizerConfig().vocab_size


def test_the_default_preset_trains_the_recommended_recipe_and_default_gpt2_the_gpt2_one():
    best, gpt2 = load_config(preset="default"), load_config(preset="default-gpt2")
    assert {k: getattr(best.model, k) for k in RECOMMENDED_MODEL} == RECOMMENDED_MODEL
    assert {k: getattr(gpt2.model, k) for k in GPT2_MODEL} == GPT2_MODEL
    assert best.pretrain.optimizer == "muon" and gpt2.pretrain.optimizer == "adamw"
    assert best.pretrain.lr == 8 * gpt2.pretrain.lr and best.pretrain.min_lr == 8 * gpt2.pretrain.min_lr
    # the same shape, schedule and every later stage: only the recipe differs
    assert best.model.n_embd == gpt2.model.n_embd and best.pretrain.max_steps == gpt2.pretrain.max_steps
    assert (best.finetune, best.sft, best.tokenizer) == (gpt2.finetune, gpt2.sft, gpt2.tokenizer)
    assert recommended(gpt2) == best
    with pytest.raises(ConfigError, match="not the GPT-2 recipe.*'position': 'rope'"):
        check_gpt2(best)  # applying the recipe twice would double the learning rate again


def test_yaml_override_changes_nested_field_and_keeps_the_rest(tmp_path):
    path = tmp_path / "over.yaml"
    path.write_text("pretrain:\n  lr: 0.01\nmodel:\n  n_layer: 3\n", encoding="utf-8")
    cfg = load_config(path, preset="tiny")
    base = load_config(preset="tiny")
    assert cfg.pretrain.lr == 0.01 and cfg.model.n_layer == 3
    assert cfg.pretrain.max_steps == base.pretrain.max_steps  # untouched fields keep the preset's values
    assert cfg.model.n_embd == base.model.n_embd
    assert isinstance(cfg.pretrain, TrainConfig) and isinstance(cfg.finetune, FinetuneConfig)


def test_toml_override_changes_nested_field(tmp_path):
    path = tmp_path / "over.toml"
    path.write_text('[pretrain]\nlr = 0.01\n\n[ingest]\nsources = ["a.txt", "b.jsonl"]\n', encoding="utf-8")
    cfg = load_config(path)
    assert cfg.pretrain.lr == 0.01
    assert cfg.ingest.sources == ["a.txt", "b.jsonl"]
    assert isinstance(cfg.ingest, IngestConfig)


def test_empty_yaml_file_is_the_preset(tmp_path):
    path = tmp_path / "empty.yml"
    path.write_text("", encoding="utf-8")
    assert load_config(path, preset="tiny") == load_config(preset="tiny")


def _load_yaml(tmp_path, text, preset="default"):
    path = tmp_path / "cfg.yaml"
    path.write_text(text, encoding="utf-8")
    return load_config(path, preset=preset)


def test_unknown_section_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"cfg\.yaml: unknown section 'pretrian'"):
        _load_yaml(tmp_path, "pretrian:\n  lr: 0.01\n")


def test_unknown_field_is_named_with_its_section(tmp_path):
    with pytest.raises(ConfigError, match=r"pretrain: unknown field\(s\) \['lrr'\]") as e:
        _load_yaml(tmp_path, "pretrain:\n  lrr: 0.01\n")
    assert "'lr'" in str(e.value)  # the known fields are listed


def test_bad_value_names_the_dotted_field(tmp_path):
    with pytest.raises(ConfigError, match=r"pretrain\.lr: must be > 0"):
        _load_yaml(tmp_path, "pretrain:\n  lr: 0\n")


def test_bad_value_in_inherited_finetune_field_names_finetune(tmp_path):
    with pytest.raises(ConfigError, match=r"finetune\.batch_size: must be > 0"):
        _load_yaml(tmp_path, "finetune:\n  batch_size: -1\n")


def test_n_embd_not_divisible_by_n_head(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.n_embd: 100 is not divisible by n_head=3"):
        _load_yaml(tmp_path, "model:\n  n_embd: 100\n  n_head: 3\n")
    with pytest.raises(ConfigError, match="n_embd"):
        ModelConfig(n_embd=100, n_head=3)


def test_passage_tokens_longer_than_block_size(tmp_path):
    with pytest.raises(ConfigError, match=r"finetune\.passage_tokens: 100 exceeds model\.block_size=64"):
        _load_yaml(tmp_path, "finetune:\n  passage_tokens: 100\n", preset="tiny")


def test_cross_field_check_sees_the_merged_values():
    """Raising block_size and passage_tokens together is valid even though either alone is not."""
    cfg = merge(load_config(preset="tiny"), {"model": {"block_size": 256}, "finetune": {"passage_tokens": 200}})
    assert (cfg.model.block_size, cfg.finetune.passage_tokens) == (256, 200)


def test_section_that_is_not_a_table(tmp_path):
    with pytest.raises(ConfigError, match="pretrain: expected a table of fields, got int"):
        _load_yaml(tmp_path, "pretrain: 3\n")


@pytest.mark.parametrize("text", ["- pretrain\n- model\n", "just a string\n"])
def test_file_that_is_not_a_mapping(tmp_path, text):
    with pytest.raises(ConfigError, match=r"cfg\.yaml"):
        _load_yaml(tmp_path, text)


@pytest.mark.parametrize("name, text", [("bad.toml", "[pretrain\nlr = 1\n"), ("bad.yaml", "pretrain: {lr: [\n")])
def test_syntax_error_names_the_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        load_config(path)


@pytest.mark.parametrize(
    "text, field",
    [
        ("pretrain:\n  lr: 1e-3\n", "pretrain.lr"),  # PyYAML reads 1e-3 (no dot) as a string
        ("pretrain:\n  max_steps: 10.5\n", "pretrain.max_steps"),
        ("pretrain:\n  compile: 'yes'\n", "pretrain.compile"),
        ("ingest:\n  sources: data.txt\n", "ingest.sources"),
        ("sft:\n  enabled: 'no'\n", "sft.enabled"),
        ("finetune:\n  enabled: 0\n", "finetune.enabled"),
    ],
)
def test_wrong_value_type_names_the_field(tmp_path, text, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.") + ": expected"):
        _load_yaml(tmp_path, text)


def test_each_optional_branch_is_on_by_default_and_turns_off_from_a_file(tmp_path):
    defaults = PipelineConfig()
    assert defaults.finetune.enabled and defaults.sft.enabled and defaults.score.enabled
    cfg = _load_yaml(tmp_path, "finetune: {enabled: false}\nsft: {enabled: false}\nscore: {enabled: false}\n", "tiny")
    assert not (cfg.finetune.enabled or cfg.sft.enabled or cfg.score.enabled)
    assert cfg.finetune.max_steps == load_config(preset="tiny").finetune.max_steps  # the rest is the preset's


def test_int_is_accepted_for_a_float_field(tmp_path):
    assert _load_yaml(tmp_path, "pretrain:\n  grad_clip: 2\n").pretrain.grad_clip == 2


def test_unknown_preset():
    with pytest.raises(ConfigError, match=r"preset: unknown preset 'huge'.*'tiny'"):
        load_config(preset="huge")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_wrong_suffix(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text('{"pretrain": {"lr": 0.01}}', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"cfg\.json: config must be \.yaml, \.yml or \.toml"):
        load_config(path)


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: IngestConfig(sources=[]), "sources"),
        (lambda: IngestConfig(val_fraction=0.5), "val_fraction"),
        (lambda: TokenizerConfig(vocab_size=259), "vocab_size"),
        (lambda: TrainConfig(min_lr=1.0, lr=0.1), "min_lr"),
        (lambda: TrainConfig(warmup_steps=600, max_steps=600), "warmup_steps"),
        (lambda: TrainConfig(device="tpu"), "device"),
    ],
)
def test_direct_construction_validates(make, field):
    with pytest.raises(ConfigError, match=f"^{field}: "):
        make()
