"""The model server: serves the `champion` (or another alias) of registered models from the MLflow registry over
the OpenAI Images API, follows promotions, and batches concurrent requests. `python -m services.serving`.

It imports the core and the shared job layer, never the control plane's routes or the worker.
"""
