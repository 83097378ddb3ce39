"""segflow: pipeline-orchestrated MLOps for semantic segmentation."""

__version__ = "0.1.0"

IGNORE_INDEX = 255
"""Mask value that marks pixels excluded from training and scoring."""

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model.json"
"""A model folder's weights and card (segflow.inference), named here for the code that must not load torch."""
