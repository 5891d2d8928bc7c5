"""Serving the run browser: a uvicorn server on 127.0.0.1, behind a random token."""

from __future__ import annotations

import secrets
import socket
import sys
import threading
import webbrowser
from typing import Any, Callable

import uvicorn

from .app import make_app
from .browse import Browser


def bind(port: int) -> socket.socket:
    """A listening socket on 127.0.0.1 (only), ``port`` 0 for a free one."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(
    systems: list[tuple[str, Any]],
    *,
    port: int = 0,
    open_browser: bool = True,
    allow_actions: bool = False,
    resolve: Callable[[str], Any],
    echo: Callable[[str], None] = print,
) -> None:
    """Serve the browser over ``systems`` ((label, System) pairs) until interrupted.

    Prints the URL to open (with its token) and opens it unless ``open_browser`` is
    false. ``resolve`` turns a copy's destination into what ``Run.to`` takes.
    """
    sock = bind(port)
    port = sock.getsockname()[1]
    token = secrets.token_urlsafe(32)
    browser = Browser(systems, allow_actions=allow_actions)
    app = make_app(browser, token, port, resolve)
    url = f"http://127.0.0.1:{port}/?token={token}"
    mode = "actions allowed (each asks first)" if allow_actions else "read-only"
    echo(f"remoterun ui ({mode}) at {url}")
    sys.stdout.flush()
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    if open_browser:
        threading.Timer(0.5, webbrowser.open, args=(url,)).start()
    try:
        server.run(sockets=[sock])
    finally:
        browser.close()
        sock.close()
        for _, system in systems:
            system.close()
