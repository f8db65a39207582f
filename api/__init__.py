"""The HTTP API (FastAPI): /v1 routes, schemas, errors as problem+json, the event stream."""
