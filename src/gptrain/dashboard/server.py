"""The dashboard's web app: a page shell and static scripts (plotly from the plotly wheel, never a CDN)
and a JSON API over run directories that needs the token printed at start.

Security: the page shell and scripts hold no data and need no token; every /api request needs
`Authorization: Bearer <token>`. Requests whose Host is not one this server was started for (DNS
rebinding) and POSTs whose Origin is another site's are refused; there is no CORS. Text from the
corpus (samples, prompts) is only ever put into the page as text, under a Content-Security-Policy
that allows no inline script.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from gptrain.dashboard.runs import describe_run, read_log_from, read_rows_from, thin
from gptrain.errors import UserError

CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
       "connect-src 'self'; font-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
MAX_NEW_TOKENS = 300
STREAM_SECONDS = 1.0


def plotly_js() -> Path:
    """plotly.min.js as the plotly package ships it."""
    import plotly

    return Path(plotly.__file__).parent / "package_data" / "plotly.min.js"


def create_app(run_dirs: list[Path], token: str, hosts: set[str]) -> FastAPI:
    """The app for these runs; hosts: the host names a request's Host header may carry."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    static = resources.files("gptrain.dashboard") / "static"
    generator = Generator()

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if urlsplit(f"//{request.headers.get('host', '')}").hostname not in hosts:
            return JSONResponse({"error": "unknown Host"}, status_code=400)
        origin = request.headers.get("origin")
        if request.method != "GET" and origin is not None and urlsplit(origin).hostname not in hosts:
            return JSONResponse({"error": "foreign Origin"}, status_code=403)
        if request.url.path.startswith("/api/"):
            given = request.headers.get("authorization", "").removeprefix("Bearer ")
            if not hmac.compare_digest(given.encode(), token.encode()):
                return JSONResponse({"error": "missing or wrong token"}, status_code=401)
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store"
        return response

    def run_dir(index: int) -> Path:
        if not 0 <= index < len(run_dirs):
            raise HTTPException(404, "no such run")
        return run_dirs[index]

    @app.get("/")
    def page() -> Response:
        return Response((static / "index.html").read_text(encoding="utf-8"), media_type="text/html")

    @app.get("/static/{name}")
    def script(name: str) -> Response:
        if name == "plotly.min.js":
            return FileResponse(plotly_js(), media_type="text/javascript")
        if name not in ("app.js", "app.css"):
            raise HTTPException(404)
        media = "text/javascript" if name.endswith(".js") else "text/css"
        return Response((static / name).read_text(encoding="utf-8"), media_type=media)

    @app.get("/api/runs")
    def runs() -> list[dict]:
        return [describe_run(d) | {"index": i} for i, d in enumerate(run_dirs)]

    @app.get("/api/rows")
    def rows(run: int = 0, offset: int = 0) -> dict:
        found, end, is_reset = read_rows_from(run_dir(run) / "metrics.jsonl", offset)
        return {"rows": thin(found) if offset == 0 or is_reset else found, "offset": end, "reset": is_reset}

    @app.get("/api/log")
    def log(run: int = 0, offset: int = 0) -> dict:
        text, end, is_reset = read_log_from(run_dir(run) / "train.log", offset)
        return {"text": text, "offset": end, "reset": is_reset}

    @app.get("/api/stream")
    async def stream(request: Request, run: int = 0, offset: int = 0) -> StreamingResponse:
        """New rows as server-sent events, once a second; a cut-back file restarts with reset: true."""
        path = run_dir(run) / "metrics.jsonl"

        async def events():
            position = offset
            while not await request.is_disconnected():
                found, position, is_reset = read_rows_from(path, position)
                if found or is_reset:
                    rows = thin(found) if is_reset else found
                    yield f"data: {json.dumps({'rows': rows, 'offset': position, 'reset': is_reset})}\n\n"
                await asyncio.sleep(STREAM_SECONDS)

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/api/control")
    async def control(request: Request) -> dict:
        from gptrain.train.control import send_command

        body = await _json(request)
        try:
            return await asyncio.to_thread(send_command, run_dir(int(body.get("run", 0))), str(body.get("command")),
                                           body.get("value"), 20.0)
        except UserError as e:
            raise HTTPException(409, str(e)) from None

    @app.post("/api/generate")
    async def generate(request: Request) -> StreamingResponse:
        body = await _json(request)
        folder = run_dir(int(body.get("run", 0)))
        options = {"temperature": float(body.get("temperature", 0.8)), "top_k": int(body.get("top_k", 50))}
        max_tokens = max(1, min(int(body.get("max_tokens", 100)), MAX_NEW_TOKENS))
        pieces = generator.stream(folder, str(body.get("checkpoint", "latest")), str(body.get("prompt", "")),
                                  max_tokens, options)
        return StreamingResponse(pieces, media_type="text/plain; charset=utf-8")

    return app


async def _json(request: Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        raise HTTPException(400, "the body is not JSON") from None
    if not isinstance(body, dict):
        raise HTTPException(400, "the body is not a JSON object")
    return body


class Generator:
    """Samples from a run's checkpoint in this (the dashboard's) process on the CPU: torch is imported
    only here, with one thread, one generation at a time, the loaded checkpoint kept until it changes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded: tuple[tuple, object] | None = None

    def _checkpoint(self, run_dir: Path, which: str):
        import torch

        from gptrain.api import Checkpoint
        from gptrain.train.checkpoint import latest_checkpoint_dir, named_dir

        torch.set_num_threads(1)
        folder = named_dir(run_dir / "checkpoints", "best") if which == "best" else latest_checkpoint_dir(run_dir)
        key = (str(folder), (folder / "state.json").stat().st_mtime_ns)
        if self._loaded is None or self._loaded[0] != key:
            self._loaded = (key, Checkpoint.load(folder, device="cpu"))
        return self._loaded[1]

    def stream(self, run_dir: Path, which: str, prompt: str, max_tokens: int, options: dict):
        """Text pieces as they are sampled (an error becomes one line of text: the page shows it)."""
        with self._lock:
            try:
                checkpoint = self._checkpoint(run_dir, which)
                yield from checkpoint.stream(prompt, max_tokens, **options)
            except (UserError, FileNotFoundError) as e:
                yield f"[{e}]"
