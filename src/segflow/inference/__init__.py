"""A trained model's predictions and their scores: sliding windows, metrics, CRF, overlays."""
