"""MLflow: tracking runs, the model card, the pyfunc flavour, the registry and promotion."""
