"""The OpenAI-compatible HTTP API and the web page, served by the coordinator (docs/http-api.md).

    bodies.py   OpenAI request bodies -> GenerateRequest, and the errors that refuse them
    replies.py  the coordinator's events -> OpenAI's JSON (chunks, whole answers, usage)
    pump.py     a session's blocking event stream, read from the event loop; a client gone frees it
    app.py      the routes (thin, like the gRPC servicers) and the key check
    server.py   uvicorn on a thread of the coordinator's process
    static/     the web page: HTML, CSS and one script, no build step
"""

from .server import HttpServer

__all__ = ["HttpServer"]
