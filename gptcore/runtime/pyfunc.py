"""A gptcore model package as an MLflow pyfunc: generation, chat and classification through `gptcore.runtime`.

MLflow's own ONNX flavour runs one `session.run` per request and cannot generate; this model
loads the package with `gptcore.runtime.load_model` (ONNX Runtime, no torch) and calls it:

- a language model reads rows with a `prompt` column and returns a `text` column, the
  continuation. The sampling settings (max_new_tokens, temperature, top_k, top_p, seed) come
  from a row's own column where it has one, else from `params`, else from `OnnxLM.generate`'s
  defaults. Rows are generated one at a time, so each row's window slides on its own.
- a chat model takes MLflow's chat schema (`mlflow.types.llm.CHAT_MODEL_INPUT_SCHEMA`: OpenAI's
  chat completion request, `messages` plus max_tokens, temperature, top_p, top_k, stop) and
  answers with a chat completion (`ChatCompletionResponse`: choices[0].message, finish_reason,
  usage). The seed, which that schema lacks, is a `params` entry (a request's top-level `seed`
  lands there when served). `mlflow models serve` takes the request as the JSON body itself.
- a classifier reads rows with a `text` column and returns `label`, `confidence` and one
  `prob_<label>` column per class.

One class serves the three kinds: in *models from code* the class is fixed before the package,
and so its kind, is known. The registry logs it that way (`pyfunc_model.py` beside this module):
nothing is pickled, so it loads where unpickling is turned off. It needs gptcore installed where
it runs.
"""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.llm import (
    CHAT_MODEL_INPUT_SCHEMA,
    CHAT_MODEL_OUTPUT_SCHEMA,
    ChatChoice,
    ChatCompletionResponse,
    ChatMessage,
    TokenUsageStats,
)
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

from gptcore.runtime.batch import prediction_columns
from gptcore.runtime.lm import check_sampling
from gptcore.runtime.package import path_inside
from gptcore.runtime.stop import Decoded, check_stops, decoded_text

# setting -> (MLflow type, default): the defaults are `OnnxLM.generate`'s.
SAMPLING = {
    "max_new_tokens": ("long", 64),
    "temperature": ("double", 1.0),
    "top_k": ("long", None),
    "top_p": ("double", None),
    "seed": ("long", None),
}
PROMPT, TEXT = "prompt", "text"
# A chat request's field -> (OnnxChat's argument, default): OpenAI's defaults, but max_tokens
# (OpenAI's is the context's room; here `OnnxChat.chat`'s 64, so a bare request stays short).
CHAT_SETTINGS = {
    "max_tokens": ("max_new_tokens", 64),
    "temperature": ("temperature", 1.0),
    "top_k": ("top_k", None),
    "top_p": ("top_p", None),
    "stop": ("stop", None),
}
# Fields of the chat schema this model cannot honour, with the one value it accepts: anything
# else is refused rather than ignored, so a client never believes it got what it asked for.
CHAT_UNSUPPORTED = {"n": 1, "stream": False, "frequency_penalty": 0.0, "presence_penalty": 0.0, "tools": None}
CHAT_PARAMS = ParamSchema([ParamSpec("seed", "long", None)])


def signature(meta: dict[str, Any]) -> ModelSignature:
    """What the model takes and returns, so `mlflow models serve` checks requests against it.

    MLflow checks columns strictly: a per-row integer setting must be given on every row or none
    (a gap turns the column into floats), and a per-row temperature or top_p other than 0 and 1
    must be written as a float (2.0, not 2). Its messages say so; `params` set one value for all rows.
    A chat model's is MLflow's chat schema, with the seed as a param.
    """
    if meta["kind"] == "chat":
        return ModelSignature(CHAT_MODEL_INPUT_SCHEMA, CHAT_MODEL_OUTPUT_SCHEMA, CHAT_PARAMS)
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


def given(value: Any) -> bool:
    """Whether a DataFrame cell holds a value (a row without one has None or NaN there)."""
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def plain(value: Any) -> Any:
    """A DataFrame cell as plain Python (numpy scalars as numbers, arrays as lists), as the runtime's checks take it."""
    if isinstance(value, np.ndarray):
        return [plain(item) for item in value.tolist()]
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value.item() if hasattr(value, "item") else value


def row_settings(row: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The sampling settings for one row: its own values over `params` over the defaults."""
    settings = {}
    for name, (_, default) in SAMPLING.items():
        value = row.get(name)
        if not given(value):
            value = params.get(name, default)
        settings[name] = plain(value)
    return settings


def chat_request(request: dict[str, Any], params: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages of one chat request and `OnnxChat.chat`'s settings for them; ValueError naming the field.

    The messages are checked by `OnnxChat` itself (roles, string contents, the last the user's).
    """
    for name, accepted in CHAT_UNSUPPORTED.items():
        value = plain(request.get(name))
        if given(value) and value != accepted:
            raise ValueError(f"{name}: this model supports only {accepted!r}, got {value!r}")
    settings = {}
    for name, (argument, default) in CHAT_SETTINGS.items():
        value = request.get(name)
        settings[argument] = plain(value) if given(value) else default
    settings["seed"] = plain(params.get("seed"))
    return plain(request.get("messages")), settings


def chat_completion(chat, messages: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    """The chat completion answering `messages` (`OnnxChat.chat`'s answer, with its token counts and why it ended).

    finish_reason is "length" when max_tokens ran out, else "stop" (the model's `<|end|>` or a
    stop string). usage counts the prompt as fitted to the context and the tokens decoded; a
    history too long for the context loses its oldest turns, counted in custom_outputs.
    """
    max_new_tokens, stops = settings["max_new_tokens"], check_stops(settings["stop"])
    check_sampling(max_new_tokens, settings["temperature"], settings["top_k"], settings["top_p"])
    prompt_ids, dropped = chat.prompt(messages, max_new_tokens)
    decoded = Decoded()
    content = "".join(
        decoded_text(
            chat,
            prompt_ids,
            max_new_tokens,
            settings["temperature"],
            settings["top_k"],
            settings["top_p"],
            settings["seed"],
            stops,
            decoded,
        )
    )
    response = ChatCompletionResponse(
        choices=[
            ChatChoice(
                index=0,
                message=ChatMessage(role="assistant", content=content),
                finish_reason=decoded.finish_reason,
            )
        ],
        usage=TokenUsageStats(len(prompt_ids), decoded.tokens, len(prompt_ids) + decoded.tokens),
        id=f"chatcmpl-{uuid.uuid4().hex}",
        model="gptcore-chat",
        custom_outputs={"dropped_messages": dropped, "variant": chat.variant},
    )
    return response.to_dict()


class GptcorePyfunc(mlflow.pyfunc.PythonModel):
    def __init__(self, model_dir: Path):
        """`model_dir`: the MLflow model directory, where MLflow runs `pyfunc_model.py` from."""
        self.model_dir = Path(os.path.realpath(model_dir))

    def load_context(self, context) -> None:
        from gptcore.runtime import load_model

        # MLflow joins MLmodel's artifact path to the model directory as it stands: a tampered
        # MLmodel could point anywhere ("../..", an absolute path) without this.
        where = f"{self.model_dir / 'MLmodel'}: field 'flavors.python_function.artifacts.package.path'"
        package = path_inside(self.model_dir, os.path.relpath(context.artifacts["package"], self.model_dir), where)
        self.model = load_model(package)

    # The DataFrame hint tells MLflow the input is a table (checked against the logged signature):
    # a chat request arrives as a one-row table of the chat schema's columns.
    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame | dict[str, Any] | list[dict[str, Any]]:
        kind = self.model.package.kind
        if kind == "chat":
            return self.predict_chat(model_input, params or {})
        column = PROMPT if kind == "lm" else TEXT
        if column not in model_input.columns:  # a call without the signature's check (serving checks first)
            raise bad_request(f"input has no {column!r} column (columns: {', '.join(map(str, model_input.columns))})")
        rows = model_input.to_dict("records")
        for i, row in enumerate(rows):
            if not isinstance(row[column], str):
                raise bad_request(f"row {i}: column {column!r} must be a string, got {row[column]!r}")
        if kind == "classifier":
            probs = self.model.predict_proba([row[TEXT] for row in rows])
            return pd.DataFrame(prediction_columns(self.model.labels, probs))
        texts = []
        for i, row in enumerate(rows):
            try:
                texts.append(self.model.generate(row[PROMPT], **row_settings(row, params or {})))
            except ValueError as e:  # the runtime's checks of the prompt and the settings (InputError is one)
                raise bad_request(f"row {i}: {e}") from None
        return pd.DataFrame({TEXT: texts})

    def predict_chat(self, model_input: pd.DataFrame, params: dict[str, Any]) -> dict[str, Any] | list[dict[str, Any]]:
        """A chat completion per request (row): for one request the completion itself, as served; else a list."""
        requests = model_input.to_dict("records")
        completions = []
        for i, request in enumerate(requests):
            try:
                completions.append(chat_completion(self.model, *chat_request(request, params)))
            except ValueError as e:  # the runtime's checks of the messages and the settings, naming the field
                message = str(e).replace("max_new_tokens:", "max_tokens:", 1)  # the request's name for it
                raise bad_request(f"request {i}: {message}" if len(requests) > 1 else message) from None
        return completions[0] if len(completions) == 1 else completions
