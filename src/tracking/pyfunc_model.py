"""The MLflow pyfunc of a trained model (MLflow "models from code": this file is the model).

``mlflow.pyfunc.load_model("models:/<name>/<version>")`` runs this file (in an environment where
this project is installed), keeps the model's ``checkpoint`` and ``config`` artifacts, and
``predict`` runs the CLI's ``predict`` on the data module of that config (paths in it are relative
to the working folder) with that checkpoint, returning the predictions CSV as a DataFrame: one row
per sample (``name, subset, label, prediction, score_<label>...``). A DataFrame with a ``name``
column selects those samples. The CLI itself never loads a pyfunc: ``--ckpt_path models:/...``
only downloads the checkpoint and reads it weights-only.
"""

import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd


class MoSEARCheckpointModel(mlflow.pyfunc.PythonModel):
    """Predictions of a logged checkpoint through ``python -m src.cli predict``."""

    def load_context(self, context: Any) -> None:
        self.checkpoint = context.artifacts["checkpoint"]
        self.config = context.artifacts["config"]

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        from src.cli import main

        with tempfile.TemporaryDirectory() as folder:
            main(
                [
                    "predict",
                    "--config",
                    self.config,
                    "--ckpt_path",
                    self.checkpoint,
                    "--trainer.logger",
                    "false",
                    "--predictions_folder",
                    folder,
                ]
            )
            (path,) = Path(folder).glob("predictions-*.csv")
            frame = pd.read_csv(path, keep_default_na=False)
        if isinstance(model_input, pd.DataFrame) and "name" in model_input.columns:
            frame = frame[frame["name"].isin(set(model_input["name"].astype(str)))]
        return frame.reset_index(drop=True)


mlflow.models.set_model(MoSEARCheckpointModel())
