"""loradock.runtime.http: the OpenAI-compatible HTTP edge of the engine (FastAPI on uvicorn).

Like the gRPC edge (`runtime/server/`) it converts to and from the engine's types and owns
nothing else; FastAPI, pydantic and uvicorn live only here, and protobuf never reaches it.
Only the CLI (the composition root) imports this package.
"""
