"""Errors a user can act on: each message names the file, record or field and what is wrong."""


class GptcoreError(Exception):
    """Base class: the CLI prints these as one line, without a traceback."""


class ConfigError(GptcoreError, ValueError):
    """A configuration field is missing, unknown or out of range."""


class InputError(GptcoreError, ValueError):
    """Input data (a corpus file, a record, a label column) cannot be used."""


class ParityError(GptcoreError):
    """An exported ONNX model does not reproduce the PyTorch model."""
