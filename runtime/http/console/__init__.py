"""The web console: the registry's adapters and versions, what the server serves, and a
playground, as pages under /ui of the HTTP edge (`loradock serve --http-port N`) or of
`loradock ui` (the registry alone, no base loaded).

Pages are rendered on the server (Jinja2 templates, no front-end build), so they show without
script; one small script (static/console.js) adds search and sort, live serving figures,
streamed playground answers and the alias forms. `Console` wires the parts: `facts.py` reads
the registry, `serving.py` the engine, `console.py` answers, `session.py` (the HTTP edge's)
logs a browser in with the server's token.
"""

from __future__ import annotations

from .console import Console, create_console_app

__all__ = ["Console", "create_console_app"]
