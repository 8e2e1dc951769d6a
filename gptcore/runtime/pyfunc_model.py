"""The MLflow *models from code* file of gptcore's pyfunc: MLflow runs this file to build the model.

The registry passes its path as `python_model`, so the logged model holds this code instead of a
pickle. The model itself is `gptcore.runtime.pyfunc.GptcorePyfunc`, one class for the LM, the chat
model and the classifier: this file runs before the package, and so its kind, is known. MLflow
runs the copy saved at the top of the model directory, so that directory is this file's.
"""

from pathlib import Path

from mlflow.models import set_model

from gptcore.runtime.pyfunc import GptcorePyfunc

set_model(GptcorePyfunc(Path(__file__).parent))
