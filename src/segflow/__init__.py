"""segflow: pipeline-orchestrated MLOps for semantic segmentation."""

__version__ = "0.1.0"

IGNORE_INDEX = 255
"""Mask value that marks pixels excluded from training and scoring."""
