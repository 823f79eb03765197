"""Pipelines: load_pipeline, generate, FP8 weight storage for text encoders and VAEs, tiny pipelines."""
