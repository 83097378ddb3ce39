"""Where a model comes from: a local model folder, or an MLflow URI downloaded for as long as it is used."""

from __future__ import annotations

import contextlib
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from segflow import CARD_FILE, WEIGHTS_FILE
from segflow.errors import SegflowError

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")  # models:/, runs:/, s3://, file://, ...


@contextlib.contextmanager
def resolve_model_dir(source: str | Path) -> Iterator[Path]:
    """A local segflow model folder for ``source``: a folder path, or an MLflow URI (``models:/NAME@ALIAS``,
    ``models:/NAME/VERSION``, ``runs:/ID/PATH``) whose artifact is downloaded into a temporary folder that
    lives as long as the ``with`` block. A registered version (``models:/``) is refused unless its files match
    the SHA-256s in its registry tags (:func:`segflow.registry.mlflow_registry.download_registered_model`)."""
    if Path(source).is_dir():
        yield Path(source)
        return
    if not _URI.match(str(source)):
        raise SegflowError(
            f"{source}: no such model folder; give a folder with {CARD_FILE} and {WEIGHTS_FILE} (e.g. models/unet) "
            "or an MLflow model URI (e.g. models:/segflow@champion)."
        )
    import mlflow  # only here: slow to import, and folders need none of it
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.utils.models import is_models_uri

    from segflow.registry.mlflow_registry import download_registered_model

    with tempfile.TemporaryDirectory() as tmp:
        if is_models_uri(str(source)):
            yield download_registered_model(str(source), Path(tmp))
            return
        try:
            local = Path(mlflow.artifacts.download_artifacts(str(source), dst_path=tmp))
        except (MlflowException, OSError) as exc:
            raise SegflowError(f"{source}: cannot download the model ({exc}).") from None
        model_dirs = sorted(p.parent for p in local.rglob(CARD_FILE))
        if not model_dirs:
            raise SegflowError(f"{source}: no segflow model ({CARD_FILE} + {WEIGHTS_FILE}) in the artifact.")
        yield model_dirs[0]
