"""segflow: pipeline-orchestrated MLOps for semantic segmentation."""

__version__ = "0.1.0"

IGNORE_INDEX = 255
"""Mask value that marks pixels excluded from training and scoring."""

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
"""ImageNet's channel statistics: every model's input normalisation."""

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model.json"
"""A model folder's weights and card (segflow.inference.predictor), named here for the code that must not load torch."""
