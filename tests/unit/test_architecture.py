"""The layer rules of docs/architecture.md: the import-linter contracts in pyproject.toml hold, a
deliberately broken rule breaks them, and what a downstream app imports pulls in no torch."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the checkout at `root` (its gptcore/ and flows/ first on the path)."""
    env = {"PYTHONPATH": str(root), "PATH": str(Path(sys.executable).parent)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )


def test_the_layer_contracts_hold():
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 kept, 0 broken" in done.stdout


@pytest.mark.parametrize(
    "module,added,broken",
    [
        # a cycle inside one package, which no layer rule sees: promotion imports gates already
        ("gptcore/registry/gates.py", "import gptcore.registry.promotion", "No import cycles, at any depth BROKEN"),
        # an arrow up the layers that also brings torch into the runtime
        ("gptcore/runtime/lm.py", "import gptcore.model", "never import torch BROKEN"),
        ("gptcore/eval/lm.py", "import gptcore.train.loop", "never import each other BROKEN"),
        ("gptcore/results.py", "import flows.summary", "Imports point down the layers"),
        ("gptcore/registry/score.py", "import prefect", "Nothing under gptcore/ imports Prefect"),
    ],
)
def test_a_broken_rule_breaks_its_contract(tmp_path, module, added, broken):
    for part in ("gptcore", "flows"):
        shutil.copytree(REPO / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    with open(tmp_path / module, "a", encoding="utf-8") as f:
        f.write(f"\n{added}  # the deliberate break\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0, done.stdout
    assert broken in " ".join(done.stdout.split()), done.stdout


@pytest.mark.parametrize(
    "modules,absent",
    [
        # what a downstream app, a batch job or the HTTP server imports
        (["gptcore.runtime"], {"torch", "prefect", "mlflow", "datasets"}),
        (["gptcore.runtime.serve.app"], {"torch", "prefect", "mlflow"}),
        # the registry side and the corpus stages, MLflow's and pyarrow's own imports included
        (
            [f"gptcore.registry.{m}" for m in ("register", "promotion", "compare", "score", "drift", "gates")]
            + ["gptcore.data.ingest", "gptcore.data.tokenizer", "gptcore.results"],
            {"torch", "prefect"},
        ),
    ],
)
def test_imported_for_real_they_load_none_of_the_heavy_packages(modules, absent):
    code = f"import sys; import {', '.join(modules)}; print(sorted(set({sorted(absent)!r}) & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"{modules} load {done.stdout.strip()}"
