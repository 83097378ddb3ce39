"""Running the DVC stages from Prefect: the stage runner and the retraining schedule."""
