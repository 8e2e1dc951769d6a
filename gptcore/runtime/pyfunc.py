"""A gptcore model package as an MLflow pyfunc: generation and classification through `gptcore.runtime`.

MLflow's own ONNX flavour runs one `session.run` per request and cannot generate; this model
loads the package with `gptcore.runtime.load_model` (ONNX Runtime, no torch) and calls it:

- a language model reads rows with a `prompt` column and returns a `text` column, the
  continuation. The sampling settings (max_new_tokens, temperature, top_k, top_p, seed) come
  from a row's own column where it has one, else from `params`, else from `OnnxLM.generate`'s
  defaults. Rows are generated one at a time, so each row's window slides on its own.
- a classifier reads rows with a `text` column and returns `label`, `confidence` and one
  `prob_<label>` column per class.

The registry logs it as *models from code* (`pyfunc_model.py` beside this module): nothing is
pickled, so it loads where unpickling is turned off. It needs gptcore installed where it runs.
"""

from __future__ import annotations

import math
from typing import Any

import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

from gptcore.runtime.batch import prediction_columns

# setting -> (MLflow type, default): the defaults are `OnnxLM.generate`'s.
SAMPLING = {
    "max_new_tokens": ("long", 64),
    "temperature": ("double", 1.0),
    "top_k": ("long", None),
    "top_p": ("double", None),
    "seed": ("long", None),
}
PROMPT, TEXT = "prompt", "text"


def signature(meta: dict[str, Any]) -> ModelSignature:
    """What the model takes and returns, so `mlflow models serve` checks requests against it.

    MLflow checks columns strictly: a per-row integer setting must be given on every row or none
    (a gap turns the column into floats), and a per-row temperature or top_p other than 0 and 1
    must be written as a float (2.0, not 2). Its messages say so; `params` set one value for all rows.
    """
    if meta["kind"] == "lm":
        inputs = Schema(
            [ColSpec("string", PROMPT), *(ColSpec(kind, name, required=False) for name, (kind, _) in SAMPLING.items())]
        )
        outputs = Schema([ColSpec("string", TEXT)])
        params = ParamSchema([ParamSpec(name, kind, default) for name, (kind, default) in SAMPLING.items()])
        return ModelSignature(inputs, outputs, params)
    outputs = Schema(
        [
            ColSpec("string", "label"),
            ColSpec("double", "confidence"),
            *(ColSpec("double", f"prob_{label}") for label in meta["labels"]),
        ]
    )
    return ModelSignature(Schema([ColSpec("string", TEXT)]), outputs)


def bad_request(message: str) -> MlflowException:
    """An error the scoring server answers with 400 and this message (a plain exception gets a generic one)."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def row_settings(row: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The sampling settings for one row: its own values over `params` over the defaults."""
    settings = {}
    for name, (_, default) in SAMPLING.items():
        value = row.get(name)
        if value is None or (isinstance(value, float) and math.isnan(value)):  # no value in this row
            value = params.get(name, default)
        # numpy scalars from the DataFrame become Python numbers, which the runtime's checks take
        settings[name] = value.item() if hasattr(value, "item") else value
    return settings


class GptcorePyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from gptcore.runtime import load_model

        self.model = load_model(context.artifacts["package"])

    # The DataFrame hint tells MLflow the input is a table (checked against the logged signature).
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        lm = self.model.package.kind == "lm"
        column = PROMPT if lm else TEXT
        if column not in model_input.columns:  # a call without the signature's check (serving checks first)
            raise bad_request(f"input has no {column!r} column (columns: {', '.join(map(str, model_input.columns))})")
        rows = model_input.to_dict("records")
        for i, row in enumerate(rows):
            if not isinstance(row[column], str):
                raise bad_request(f"row {i}: column {column!r} must be a string, got {row[column]!r}")
        if not lm:
            probs = self.model.predict_proba([row[TEXT] for row in rows])
            return pd.DataFrame(prediction_columns(self.model.labels, probs))
        texts = []
        for i, row in enumerate(rows):
            try:
                texts.append(self.model.generate(row[PROMPT], **row_settings(row, params or {})))
            except ValueError as e:  # the runtime's checks of the prompt and the settings (InputError is one)
                raise bad_request(f"row {i}: {e}") from None
        return pd.DataFrame({TEXT: texts})
