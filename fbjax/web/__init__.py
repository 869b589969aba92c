"""What the HTTP server (:mod:`fbjax.serve`) and the HTTP router (:mod:`fbjax.router`)
share, so that neither imports the other: OpenAI-shaped error bodies and the listening
socket bound before a slow start-up."""
