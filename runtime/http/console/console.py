"""`Console`: the console's routes on a FastAPI app (pages, their JSON, login, alias writes).

Reads need the server's token when it has one (the login page sets the session cookie;
a bearer header works too). Writes (moving an alias, rolling one back) need all of: adapter
updates allowed (`--allow-adapter-updates`), a token configured and presented, and the
`X-Loradock-Console` header, which a cross-site form cannot send. Otherwise the pages are
read-only and say why.
"""

from __future__ import annotations

import hmac
import json
import urllib.parse
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from loradock.registry import InvalidNameError, NotFoundError, Registry, RegistryError
from loradock.registry.trust import TrustPolicy

from ..session import clear_cookie_header, presents_token, set_cookie_header
from .facts import RegistryView, ServedBase
from .serving import INTERVAL_S, ServingWindow

HERE = Path(__file__).parent
WRITE_HEADER = "X-Loradock-Console"
MAX_FORM_BYTES = 4096


class Console:
    """The console over `registry`, and over `engine` when a server runs one (None: `loradock ui`)."""

    def __init__(self, registry: Registry, *, engine=None, auth_token: str | None = None,
                 allow_updates: bool = False, policy: TrustPolicy | None = None,
                 serving_interval_s: float = INTERVAL_S) -> None:
        self.registry = registry
        self.engine = engine
        self.auth_token = auth_token
        self.allow_updates = allow_updates
        self._policy = policy
        self._view: RegistryView | None = None
        # A cluster's ingress holds no engine of its own (no slots, no KV): its replicas report at /metrics.
        local = engine is not None and hasattr(engine, "resident_adapters")
        self.serving = ServingWindow(engine, serving_interval_s) if local else None
        self._templates = Environment(loader=FileSystemLoader(HERE / "templates"),
                                      autoescape=select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True)
        self._templates.filters["size"] = _human_size

    # ---- what the pages read ----

    @property
    def view(self) -> RegistryView:
        """The registry view, told what the engine serves once it is ready."""
        if self._view is None or (self._view.served is None and self._engine_ready()):
            served = None
            if self._engine_ready():
                info = self.engine.info()
                served = ServedBase(info.base_name, info.base_fingerprint, info.max_rank)
            policy = self._policy if self._policy is not None else _engine_policy(self.engine)
            self._view = RegistryView(self.registry, served, policy)
        return self._view

    def _engine_ready(self) -> bool:
        return self.engine is not None and bool(self.engine.ready)

    def writes_refused(self, request: Request) -> str:
        """Why this caller may not move aliases here ("" when it may)."""
        if not self.allow_updates:
            return "read-only: the server was started without --allow-adapter-updates"
        if not self.auth_token:
            return "read-only: moving aliases from the page needs a token (--auth-token-file)"
        if not self.authenticated(request):
            return "read-only until you log in"
        if not self.registry.is_writable():
            return f"read-only: {self.registry.root} cannot be written here"
        return ""

    def authenticated(self, request: Request) -> bool:
        return not self.auth_token or presents_token(request.headers.get("authorization"),
                                                     request.headers.get("cookie"), self.auth_token)

    # ---- the app ----

    def mount(self, app: FastAPI) -> None:
        """Add the console's routes to `app` (left out of its OpenAPI document: pages, not API)."""
        app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="console-static")
        route = app.api_route

        @route("/ui", methods=["GET"], include_in_schema=False)
        def home() -> Response:
            return RedirectResponse("/ui/adapters", status_code=303)

        @route("/ui/login", methods=["GET"], include_in_schema=False)
        def login_page(request: Request, next: str = "/ui/adapters") -> Response:
            return self._page(request, "login.html", title="Log in", next=_local(next), error="")

        @route("/ui/login", methods=["POST"], include_in_schema=False)
        async def login(request: Request) -> Response:
            form = await _form(request)
            target = _local(form.get("next", "/ui/adapters"))
            token = form.get("token", "")
            if not self.auth_token:
                return RedirectResponse(target, status_code=303)
            if not hmac.compare_digest(token.encode(), self.auth_token.encode()):
                return self._page(request, "login.html", status=401, title="Log in", next=target,
                                  error="That is not this server's token.")
            response = RedirectResponse(target, status_code=303)
            response.headers["set-cookie"] = set_cookie_header(self.auth_token, request.url.scheme == "https")
            return response

        @route("/ui/logout", methods=["POST"], include_in_schema=False)
        def logout() -> Response:
            response = RedirectResponse("/ui/login", status_code=303)
            response.headers["set-cookie"] = clear_cookie_header()
            return response

        @route("/ui/adapters", methods=["GET"], include_in_schema=False)
        def adapters_page(request: Request) -> Response:
            return self._guarded(request) or self._page(request, "adapters.html", title="Adapters",
                                                        adapters=self.view.adapters(), served=self.view.served)

        @route("/ui/adapters/{ref:path}", methods=["GET"], include_in_schema=False)
        def version_page(request: Request, ref: str) -> Response:
            refused = self._guarded(request)
            if refused:
                return refused
            name, _, number = ref.rpartition("/")
            try:
                version = self.view.version(f"{name}@{number}" if number.isdigit() else ref)
            except (NotFoundError, InvalidNameError) as e:
                return self._page(request, "missing.html", status=404, title="Not found", message=str(e))
            except RegistryError as e:  # a damaged version: say so rather than fail the page
                return self._page(request, "missing.html", status=500, title="Unreadable version", message=str(e))
            return self._page(request, "version.html", title=version["ref"], v=version)

        @route("/ui/serving", methods=["GET"], include_in_schema=False)
        def serving_page(request: Request) -> Response:
            return self._guarded(request) or self._page(request, "serving.html", title="Serving",
                                                        serving=self._serving())

        @route("/ui/playground", methods=["GET"], include_in_schema=False)
        def playground_page(request: Request) -> Response:
            refused = self._guarded(request)
            if refused:
                return refused
            models = []
            if self._engine_ready():
                models = [self.engine.info().base_name] + [
                    ref for a in self.view.adapters() if not a["latest"]["unservable"]
                    for ref in (a["name"], *(f"{a['name']}@{alias}" for alias in sorted(a["aliases"])))]
            return self._page(request, "playground.html", title="Playground", models=models,
                              serving=self._engine_ready())

        @route("/ui/api/adapters", methods=["GET"], include_in_schema=False)
        def adapters_json(request: Request) -> Response:
            return self._guarded(request, api=True) or JSONResponse(self.view.adapters())

        @route("/ui/api/serving", methods=["GET"], include_in_schema=False)
        def serving_json(request: Request) -> Response:
            return self._guarded(request, api=True) or JSONResponse(self._serving())

        @route("/ui/api/aliases", methods=["POST"], include_in_schema=False)
        async def move_alias(request: Request) -> Response:
            """{"name", "alias", "version", "weight" (100: move; less: a canary), "reason",
            "require" (evaluation gates, as `adapters tag --require`: nothing moves unless the
            version's newest records meet them)}."""
            return await self._write(request, lambda body: self.registry.tag(
                f"{body['name']}@{int(body['version'])}", body["alias"], _reason(body),
                weight=int(body.get("weight", 100)), require=_requirements(body)))

        @route("/ui/api/rollback", methods=["POST"], include_in_schema=False)
        async def rollback(request: Request) -> Response:
            """{"name", "alias", "reason"}: the alias back to its previous target."""
            return await self._write(request, lambda body: self.registry.rollback(
                body["name"], body["alias"], _reason(body)))

    # ---- helpers ----

    def _serving(self) -> dict:
        if self.serving is None:
            return {"ready": False, "server": self.engine is not None, "cluster": self.engine is not None}
        snapshot = self.serving.snapshot()
        if snapshot["ready"]:
            resident = {*snapshot["resident"]["device"], *snapshot["resident"]["host"]}
            snapshot["resident"]["disk"] = sum(1 for a in self.view.adapters() for v in a["versions"]
                                               if not v["unservable"] and v["ref"] not in resident)
        return {**snapshot, "server": True}

    def _guarded(self, request: Request, api: bool = False) -> Response | None:
        """None when the caller may read, else the login page (pages) or a 401 (JSON)."""
        if self.authenticated(request):
            return None
        if api:
            return JSONResponse({"error": "log in first (POST /ui/login) or send the bearer token"}, status_code=401)
        target = urllib.parse.quote(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
        return RedirectResponse(f"/ui/login?next={target}", status_code=303)

    async def _write(self, request: Request, act) -> Response:
        why = self.writes_refused(request)
        if why:
            return JSONResponse({"error": why}, status_code=401 if self.auth_token and not self.authenticated(request)
                                else 403)
        if request.headers.get(WRITE_HEADER) != "1":
            return JSONResponse({"error": f"console writes need the {WRITE_HEADER}: 1 header"}, status_code=403)
        try:
            body = json.loads(await request.body())
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            version = act(body)
        except NotFoundError as e:  # (a KeyError too: before the bad-body case)
            return JSONResponse({"error": str(e)}, status_code=404)
        except InvalidNameError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        except RegistryError as e:  # e.g. an unmet evaluation gate, nothing moved
            return JSONResponse({"error": str(e)}, status_code=409)
        except (KeyError, TypeError, ValueError) as e:
            return JSONResponse({"error": f"bad request: {e}"}, status_code=400)
        return JSONResponse({"ref": version.ref, "name": version.name, "version": version.version})

    def _page(self, request: Request, template: str, status: int = 200, **context) -> HTMLResponse:
        context |= {
            "request_path": request.url.path, "logged_in": bool(self.auth_token) and self.authenticated(request),
            "writes_refused": self.writes_refused(request),
            "server": self.engine is not None,
            "base": self.engine.info().base_name if self._engine_ready() else None,
            "refresh_ms": int(1000 * min(2.0, self.serving.interval_s)) if self.serving else 2000,
        }
        return HTMLResponse(self._templates.get_template(template).render(**context), status_code=status,
                            headers={"cache-control": "no-store"})


def create_console_app(registry: Registry, *, auth_token: str | None = None, allow_updates: bool = False,
                       policy: TrustPolicy | None = None) -> FastAPI:
    """The console alone over `registry` (`loradock ui`): no base, so no serving or playground."""
    app = FastAPI(title="loradock console", openapi_url=None, docs_url=None, redoc_url=None)
    Console(registry, auth_token=auth_token, allow_updates=allow_updates, policy=policy).mount(app)
    return app


def _engine_policy(engine) -> TrustPolicy | None:
    """The trust policy the engine serves under (`--trust`), to show each version's verdict."""
    return getattr(getattr(engine, "adapters", None), "trust", None)


def _reason(body: dict) -> str:
    reason = str(body.get("reason") or "").strip()
    return f"{reason} (console)" if reason else "from the console"


def _requirements(body: dict) -> list[str]:
    """"contains>=0.8, contains>base" (or a list) -> ["contains>=0.8", "contains>base"]."""
    given = body.get("require") or []
    items = given.split(",") if isinstance(given, str) else given
    if not all(isinstance(r, str) for r in items):
        raise ValueError("require must be a string or a list of strings")
    return [r.strip() for r in items if r.strip()]


def _local(target: str) -> str:
    """`target` if it is a path of this console, else the adapters page (no open redirects)."""
    return target if target.startswith("/ui") and not target.startswith("//") else "/ui/adapters"


async def _form(request: Request) -> dict[str, str]:
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        return {}
    return {k: v[0] for k, v in urllib.parse.parse_qs(body.decode("utf-8", errors="replace")).items()}


def _human_size(n: float) -> str:
    """1536 -> "1.5 KB" (as the page's script writes live sizes)."""
    unit = "B"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            break
        n /= 1024
    return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
