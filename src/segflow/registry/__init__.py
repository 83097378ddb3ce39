"""MLflow: tracking runs, the registry and promotion, the pyfunc flavour, where a model comes from."""
