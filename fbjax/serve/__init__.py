"""OpenAI-compatible HTTP server over the engine: ``python -m fbjax.serve``.

``app`` (FastAPI endpoints), ``protocol`` (pydantic request models, error bodies),
``engine_loop`` (the thread that owns and steps the engine), ``text`` (incremental
detokenization, stop strings, chat templates), ``metrics`` (Prometheus).
"""
