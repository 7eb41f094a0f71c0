"""The training service: consumes the pipeline, trains the model, evaluates, logs.

``service.train`` is the training loop (single process for now); checkpoints, resume, clean
shutdown, Prometheus metrics and torchrun scaling build on it.
"""
