"""`gptcore serve`: the HTTP API over the runtime (the app, request limits, admission, served models,
Prometheus metrics)."""
