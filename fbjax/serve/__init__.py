"""OpenAI-compatible HTTP server over the engine: ``python -m fbjax.serve``.

``app`` (assembles the FastAPI app: lifespan, error handlers, API key), ``routes``
(the endpoints; ``routes.generate`` is the path both generation endpoints share),
``state`` (settings and what every handler shares), ``validation`` (request checks),
``generation`` (one request's engine requests and their text), ``responses`` (OpenAI
body shapes), ``streaming`` (SSE or one JSON body), ``protocol`` (pydantic request
models, error bodies), ``engine_loop`` (the thread that owns and steps the engine),
``text`` (incremental detokenization, stop strings, chat templates), ``metrics``
(Prometheus).
"""
