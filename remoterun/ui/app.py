"""The run browser's web app (starlette): the page, its scripts and a JSON API.

Every request must carry the server's token: in the URL (``?token=``, as the printed
link has it), in the cookie the first such visit sets, or in the ``X-Remoterun-Token``
header. Anything else gets 403, compared in constant time. A request whose ``Host`` is
not this server's own loopback address is refused as well (a page of another site that
renames itself to 127.0.0.1 cannot read the API). Actions are POSTs that need the token
in the header (which no other site's form can set), ``--allow-actions`` and the run's
name repeated as confirmation.
"""

from __future__ import annotations

import hmac
import json
import pathlib
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import RemoterunError, RunNotFoundError
from .browse import ActionRefused, Browser

STATIC = pathlib.Path(__file__).resolve().parent / "static"
TOKEN_HEADER = "x-remoterun-token"


def cookie_name(port: int) -> str:
    """The token's cookie, one per port (cookies do not tell ports apart)."""
    return f"remoterun-ui-{port}"


class TokenGate:
    """ASGI middleware: 403 for a request without the token or for another host."""

    def __init__(self, app: ASGIApp, token: str, port: int):
        self.app = app
        self.token = token.encode()
        self.port = port
        self.hosts = {f"127.0.0.1:{port}".encode(), f"localhost:{port}".encode()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # the page uses none: refused, token or not
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        host = request.headers.get("host", "").encode()
        if host not in self.hosts:
            await _forbidden("this server answers on its own 127.0.0.1 address only")(
                scope, receive, send
            )
            return
        given = request.query_params.get("token")
        from_url = given is not None and self._matches(given)
        ok = from_url or any(
            self._matches(value)
            for value in (
                request.cookies.get(cookie_name(self.port)),
                request.headers.get(TOKEN_HEADER),
            )
            if value
        )
        if not ok:
            await _forbidden(
                "no valid token: open the link `remoterun ui` printed (it ends in ?token=...)"
            )(scope, receive, send)
            return
        if not from_url:
            await self.app(scope, receive, send)
            return

        async def send_with_cookie(message: dict) -> None:
            if message["type"] == "http.response.start":
                cookie = (
                    f"{cookie_name(self.port)}={self.token.decode()}; Path=/; HttpOnly; "
                    "SameSite=Strict"
                )
                message.setdefault("headers", []).append((b"set-cookie", cookie.encode()))
            await send(message)

        await self.app(scope, receive, send_with_cookie)

    def _matches(self, value: str) -> bool:
        return hmac.compare_digest(value.encode(), self.token)


def _forbidden(why: str) -> Response:
    return JSONResponse({"error": why}, status_code=403)


def make_app(browser: Browser, token: str, port: int, resolve: Callable[[str], Any]) -> ASGIApp:
    """The ASGI app over ``browser``, behind the token gate. ``resolve`` turns a copy's
    destination (a store URL, a saved cluster) into what ``Run.to`` takes."""

    page = (STATIC / "index.html").read_text()

    async def index(request: Request) -> Response:
        html = page.replace("{{TOKEN}}", token).replace(
            "{{ACTIONS}}", "true" if browser.allow_actions else "false"
        )
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        path = (STATIC / name).resolve()
        if path.parent != STATIC or not path.is_file():
            return JSONResponse({"error": f"no file {name}"}, status_code=404)
        return FileResponse(path)

    def api(body: Callable[[Request], Any]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            from starlette.concurrency import run_in_threadpool

            try:
                answer = await run_in_threadpool(body, request)
            except ActionRefused as exc:
                return JSONResponse({"error": str(exc)}, status_code=403)
            except RunNotFoundError as exc:
                return JSONResponse({"error": str(exc)}, status_code=404)
            except (RemoterunError, ValueError, KeyError) as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
            except Exception as exc:  # a store or host failing: told to the page
                return JSONResponse({"error": f"{type(exc).__name__}: {exc}"}, status_code=502)
            return Response(
                json.dumps(answer, default=str),
                media_type="application/json",
                headers={"Cache-Control": "no-store"},
            )

        return endpoint

    def runs(request: Request) -> Any:
        q = request.query_params
        return browser.runs(
            offset=int(q.get("offset", 0)),
            limit=int(q.get("limit", 50)),
            sort=q.get("sort", "start"),
            desc=q.get("desc", "1") == "1",
            status=q.get("status", ""),
            query=q.get("q", ""),
        )

    def one(request: Request) -> Any:
        q = request.query_params
        return browser.run(q.get("source"), q.get("name"), q.get("url"))

    def log(request: Request) -> Any:
        q = request.query_params
        return browser.log(
            q.get("source"),
            q.get("name"),
            q.get("stream", "stdout"),
            int(q.get("offset", 0)),
            url=q.get("url"),
        )

    def metrics(request: Request) -> Any:
        refs = []
        for ref in request.query_params.get("runs", "").split(","):
            if ":" in ref:
                key, name = ref.split(":", 1)
                refs.append((key, name))
        return browser.metrics(refs)

    def graph(request: Request) -> Any:
        q = request.query_params
        return browser.graph(q.get("source"), q.get("name"), q.get("url"))

    async def act(request: Request) -> Response:
        # The token in a header: a form of another site can send the cookie, not this.
        given = request.headers.get(TOKEN_HEADER, "")
        if not hmac.compare_digest(given.encode(), token.encode()):
            return _forbidden("actions need the token in the X-Remoterun-Token header")
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "the body must be JSON"}, status_code=400)

        def run_action(_request: Request) -> Any:
            return browser.act(
                str(body.get("action")),
                body.get("source"),
                body.get("name"),
                confirm=body.get("confirm"),
                target=body.get("target"),
                url=body.get("url"),
                resolve=resolve,
            )

        return await api(run_action)(request)

    routes = [
        Route("/", index),
        Route("/static/{name}", static),
        Route("/api/runs", api(runs)),
        Route("/api/run", api(one)),
        Route("/api/log", api(log)),
        Route("/api/metrics", api(metrics)),
        Route("/api/graph", api(graph)),
        Route("/api/action", act, methods=["POST"]),
    ]
    return TokenGate(Starlette(routes=routes), token, port)
