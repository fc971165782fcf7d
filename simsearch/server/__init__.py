"""`simsearch serve`: the HTTP API and web page over one index (the `server` extra:
FastAPI and uvicorn). `create_app(Settings(index=...))` is the ASGI application."""
