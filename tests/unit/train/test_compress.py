"""Compress: structured pruning, recovery by distillation, and the students' export and registration."""

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gptcore.config import CompressConfig, EvalConfig, ExportConfig, ModelConfig
from gptcore.errors import ConfigError
from gptcore.eval.lm import evaluate_lm
from gptcore.export.lm import export_lm_onnx
from gptcore.model import GPT
from gptcore.registry.register import register
from gptcore.results import load_compressed, load_export, load_pretrained
from gptcore.train.compress import compress
from gptcore.train.prune import measure_importance, param_count, prune, student_shape

ARCHITECTURES = [
    {},
    {"position": "rope", "norm": "rmsnorm", "qk_norm": True, "mlp": "swiglu", "tie_embeddings": False, "bias": False},
]


def random_gpt(**options) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(block_size=16, n_layer=4, n_head=2, n_embd=32, vocab_size=50, **options)).eval()


def windows(n: int = 8) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 50, (n, 17))


@pytest.mark.parametrize("options", ARCHITECTURES, ids=["gpt2", "recipe"])
def test_pruning_nothing_gives_the_teacher_exactly(options):
    teacher = random_gpt(**options)
    student, kept = prune(teacher, teacher.cfg, measure_importance(teacher, windows(), batch_size=4))
    assert kept.blocks == [0, 1, 2, 3]
    t, s = teacher.state_dict(), student.state_dict()
    assert t.keys() == s.keys()
    assert all(torch.equal(t[k], s[k]) for k in t)


@pytest.mark.parametrize("options", ARCHITECTURES, ids=["gpt2", "recipe"])
def test_a_pruned_student_has_the_shape_it_was_cut_to(options):
    teacher = random_gpt(**options)
    shape = student_shape(teacher.cfg, 0.5, "both")
    student, kept = prune(teacher, shape, measure_importance(teacher, windows(), batch_size=4))
    assert shape.n_layer == 2 and len(kept.blocks) == 2 and shape.n_embd < 32
    assert student.num_parameters() == param_count(shape) <= 0.5 * teacher.num_parameters()
    assert student.num_parameters() > 0.4 * teacher.num_parameters()  # the largest shape within the share
    logits, _ = student(torch.as_tensor(windows(2)[:, :16]))
    assert logits.shape == (2, 16, student.lm_head.out_features) and torch.isfinite(logits).all()


def test_depth_pruning_past_the_embedding_is_refused_with_the_reason():
    teacher = random_gpt()
    assert student_shape(teacher.cfg, 0.8, "depth").n_layer == 3  # width kept
    with pytest.raises(ConfigError, match=r"compress\.fractions: depth pruning cannot reach 5%"):
        student_shape(teacher.cfg, 0.05, "depth")


def test_compress_config_is_checked():
    with pytest.raises(ConfigError, match=r"fractions: each must be in \(0, 1\]"):
        CompressConfig(fractions=[0.5, 1.5])
    with pytest.raises(ConfigError, match="prune"):
        CompressConfig(prune="heads")


def recovery(**overrides) -> CompressConfig:
    """Ten recovery steps, checkpointed at 5 and 10."""
    return CompressConfig(
        **{
            "fractions": [0.5],
            "max_steps": 10,
            "batch_size": 8,
            "warmup_steps": 2,
            "eval_interval": 5,
            "eval_batches": 2,
            "log_interval": 5,
            "checkpoint_interval": 5,
            "keep_checkpoints": 5,
            "calibration_windows": 8,
            "device": "cpu",
        }
        | overrides
    )


@pytest.fixture(scope="module")
def compressed(trained, tmp_path_factory):
    """The tiny GPT's students at half its parameters: pruned, distilled, and trained from scratch."""
    out = tmp_path_factory.mktemp("compress")
    return compress(recovery(scratch=True), trained["pre"], trained["tokenizer"], out)


def test_each_student_is_written_as_a_pretrained_model(compressed):
    assert [s.name for s in compressed.students] == ["p50-pruned", "p50-distilled", "p50-scratch"]
    assert load_compressed(compressed.out_dir) == compressed
    for student in compressed.students:
        assert 0.4 < student.param_fraction <= 0.5
        result = load_pretrained(student.out_dir)  # what evaluation and export read
        assert result.num_params == student.num_params and result.steps == (0 if student.recipe == "prune" else 10)
    with pytest.raises(ConfigError, match=r"--student '\.\./pretrain': the compress stage in .* made p50-pruned"):
        compressed.named("../pretrain")  # a name from the user is one the stage wrote, never a path


def test_distillation_resumes_exactly(trained, compressed, tmp_path):
    """Stopping the recovery at step 5 and resuming gives the step-10 weights of never stopping."""
    done = compressed.named("p50-distilled").out_dir
    again = tmp_path / "p50-distilled" / "checkpoints"
    again.mkdir(parents=True)
    shutil.copytree(f"{done}/checkpoints/step_000005", again / "step_000005")
    compress(recovery(scratch=True), trained["pre"], trained["tokenizer"], tmp_path, resume=True)
    a = load_file(f"{done}/checkpoints/step_000010/model.safetensors")
    b = load_file(again / "step_000010" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_student_exports_with_parity_and_registers_with_its_recipe(
    trained, compressed, lm_package, lm_evaluation, mlflow_tracking, tmp_path
):
    student = compressed.named("p50-distilled")
    package = export_lm_onnx(ExportConfig(variants=[]), student.out_dir, trained["tokenizer"], tmp_path / "pkg")
    assert package.parity["max_abs_logit_diff"] < 1e-3  # the export's own check passed, and says so
    meta = load_export(package.package_dir)
    assert meta["num_params"] == student.num_params and meta["compression"]["recipe"] == "prune+distill"
    evaluation = evaluate_lm(
        EvalConfig(prompts=["x"], max_new_tokens=1),
        student.out_dir,
        trained["tokenizer"],
        tmp_path / "eval",
        data_dir=trained["data"],
    )

    teacher = register(lm_package.package_dir, lm_evaluation.metrics_path, "lm", mlflow_tracking)
    registered = register(package.package_dir, evaluation.metrics_path, "lm", mlflow_tracking)
    client = mlflow_tracking.client()
    version = client.get_model_version("lm", registered.version)
    assert version.tags["gptcore.compression.recipe"] == "prune+distill"
    assert version.tags["gptcore.compression.student"] == "p50-distilled"
    assert float(version.tags["gptcore.compression.param_fraction"]) == student.param_fraction
    assert version.tags["gptcore.num_params"] == str(student.num_params)
    assert "gptcore.compression.recipe" not in client.get_model_version("lm", teacher.version).tags
    # served by its size: the student's own alias, while the gate judged it as any challenger
    assert str(client.get_model_version_by_alias("lm", "p50-distilled").version) == registered.version
    assert registered.previous_champion_version == teacher.version


def test_scratch_and_distilled_students_share_a_shape_and_steps(compressed):
    distilled, scratch = compressed.named("p50-distilled"), compressed.named("p50-scratch")
    a, b = load_pretrained(distilled.out_dir), load_pretrained(scratch.out_dir)
    assert a.model == b.model and a.steps == b.steps and a.tokens_seen == b.tokens_seen
