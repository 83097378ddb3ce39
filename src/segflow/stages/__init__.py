"""One module per pipeline stage (and ``predict``): each a plain function the CLI, dvc.yaml and the flows call."""
