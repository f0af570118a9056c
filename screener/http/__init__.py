"""The node's HTTP side: health checks, Prometheus metrics and a read-only status page.

`server.HttpServer` runs it beside the DICOM listener (started and stopped by screener.node.Node),
`app.create_app` is the ASGI application, `status` reads what the pages show, `pages` renders them,
`health` has the readiness checks and the destinations' C-ECHO, `auth` the credentials and CSRF.
"""

from screener.http.server import HttpServer

__all__ = ["HttpServer"]
