"""The web console: static pages that talk to the public HTTP API like any script (no private back door).
`routes()` is all the server needs; nothing here imports the rest of tokenmill."""

from tokenmill.console.pages import routes

__all__ = ["routes"]
