"""The options that name a model, shared by every command that loads one (``model.artifact.load_artifact``)."""
import argparse

MODEL_HELP = "models:/NAME@ALIAS, models:/NAME/VERSION, a checkpoint directory, model.pt or .pth"


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """``--tracking-uri`` for registered models, ``--preset``/``--num-classes`` for official ``.pth`` files."""
    parser.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default $MLFLOW_TRACKING_URI)")
    parser.add_argument("--preset", help="dino_core preset, for official .pth files")
    parser.add_argument("--num-classes", type=int, help="class-head size, for official .pth files")
