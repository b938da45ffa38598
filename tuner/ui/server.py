"""`tuner ui`: the web app (FastAPI, one plain page) and how it is served: loopback by default, auth otherwise.

Binding an address other than loopback needs `--auth user:password` or `--auth TOKEN_FILE`; every request then
needs HTTP Basic credentials (with a token file: any user name and the token as password) or
`Authorization: Bearer TOKEN`, else 401. The routes live in `tuner.ui.routes`, the page in `tuner/ui/static/`.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.errors import ConfigError, TunerError

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_UPLOAD_MB = 25.0


@dataclass(frozen=True)
class Auth:
    """Who may use the app: a user and password, or (user None) a token from a file."""

    user: str | None
    secret: str

    def allows(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and self.user is None:
            return hmac.compare_digest(value.strip().encode(), self.secret.encode())
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        user_ok = self.user is None or hmac.compare_digest(user.encode(), self.user.encode())
        return hmac.compare_digest(password.encode(), self.secret.encode()) and user_ok


def parse_auth(value: str | None) -> Auth | None:
    """`--auth user:password`, or `--auth FILE` holding a token (its first line)."""
    if not value:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        token = path.read_text(encoding="utf-8").strip().splitlines()
        if not token or len(token[0].strip()) < 8:
            raise ConfigError(f"--auth {value}: the token file must hold a token of at least 8 characters")
        return Auth(None, token[0].strip())
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ConfigError("--auth: expected user:password or the path of a token file")
    return Auth(user, password)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, auth: Auth | None) -> None:
    """Refuse to serve another address than loopback without credentials: uploads and training are a shell."""
    if not is_loopback(host) and auth is None:
        raise ConfigError(
            f"--host {host}: not a loopback address, and anyone who reaches it could upload files and run training; "
            "add --auth user:password (or --auth TOKEN_FILE), or keep the default --host 127.0.0.1"
        )


def create_app(runs_dir: str | Path, auth: Auth | None = None, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB) -> Any:
    """The FastAPI app over `runs_dir`; `app.state.queue.close()` stops its watcher (and a run still going)."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse, Response
        from fastapi.staticfiles import StaticFiles
    except ImportError:
        raise TunerError("tuner ui needs its web packages: pip install 'ldm-tuner[ui]'") from None
    from tuner.ui.process import RunQueue
    from tuner.ui.routes import router
    from tuner.ui.store import RunStore

    app = FastAPI(title="tuner ui", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store = RunStore(runs_dir)
    app.state.queue = RunQueue(app.state.store)
    app.state.max_upload = int(max_upload_mb * 1024 * 1024)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if auth is not None and not auth.allows(request.headers.get("authorization")):
            return Response("credentials required\n", status_code=401,
                            headers={"WWW-Authenticate": 'Basic realm="tuner ui", charset="UTF-8"'})  # fmt: skip
        return await call_next(request)

    @app.exception_handler(TunerError)
    async def _user_error(request: Request, exc: TunerError):
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError):
        # FastAPI's default answer echoes the submitted values; a request may carry a hub token.
        fields = ", ".join(".".join(str(p) for p in e.get("loc", ())) + f": {e.get('msg')}" for e in exc.errors())
        return JSONResponse({"error": f"bad request ({fields})"}, status_code=422)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        import logging

        logging.getLogger(__name__).exception("tuner ui: %s %s failed", request.method, request.url.path)
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); the server log has details"},
                            status_code=500)  # fmt: skip

    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def serve(host: str = "127.0.0.1", port: int = 7860, runs_dir: str | Path = "tuner-runs", auth: str | None = None,
          max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB) -> None:  # fmt: skip
    """`tuner ui`: check the bind, build the app, serve until Ctrl-C (a run still going saves a checkpoint)."""
    credentials = parse_auth(auth)
    check_bind(host, credentials)
    try:
        import uvicorn
    except ImportError:
        raise TunerError("tuner ui needs its web packages: pip install 'ldm-tuner[ui]'") from None
    app = create_app(runs_dir, credentials, max_upload_mb)
    shown = f"[{host}]" if ":" in host else host
    guard = "" if credentials is None else " (sign-in required: --auth)"
    if not is_loopback(host):
        print(f"tuner ui: serving {host}, not only this machine{guard}; put it behind HTTPS to use it over a network")
    print(f"tuner ui: http://{shown}:{port}{guard} · runs in {Path(runs_dir).resolve()}", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        app.state.queue.close()
