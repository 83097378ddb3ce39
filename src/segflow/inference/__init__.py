"""A trained model's card, predictions and their scores: sliding windows, metrics, CRF, overlays."""
