"""The model as a web service: one page to try it, and a JSON API to build on.

    GET  /              the page: drop an X-ray, see the label, probabilities and Grad-CAM
    POST /predict       multipart form, field `file` (PNG, JPEG or DICOM); `?cam=true` adds
                        the Grad-CAM overlay as a base64 PNG
    GET  /model         what is served: name, labels, input size, threshold, calibration
    GET  /health        liveness
    GET  /openapi.json, /docs   the schema, and Swagger UI (its files served from here:
                                it works offline)

Why FastAPI + uvicorn and not Gradio: the product is a JSON API other programs
call, and FastAPI gives it request validation and an OpenAPI schema for free;
the page is one static HTML file using that same API. Gradio would pull a large
dependency tree, serve assets from elsewhere, and hide the API behind its own
protocol.

Safe by default: binds 127.0.0.1 (the CLI warns otherwise) and answers only requests
addressed to it, never a POST from another site's page (`SameSiteOnly`); request bodies are
capped (413 as soon as the declared or received size passes the cap, before the
rest is read); images are recognised by decoding their content, never by the
file name; the decoder refuses decompression bombs; nothing a client sends is
unpickled; bad input gets a 4xx with a JSON `detail` saying what to send instead.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field

from cxrkit import __version__
from cxrkit.data.io import DICOM_SUFFIXES, LARGEST_FILM_MB, TOO_MANY_PIXELS
from cxrkit.predict import CAM_PNG_COMPRESSION, Predictor
from cxrkit.spec import INTENDED_USE

# Takes any film the reader takes: a full-size uncompressed 16-bit DR film is over 30 MB.
DEFAULT_MAX_UPLOAD_MB = float(LARGEST_FILM_MB)
HOW_TO_POST = ("POST /predict takes multipart/form-data with the image (PNG, JPEG or DICOM) in "
               "a field named 'file', e.g. curl -F file=@film.png http://HOST/predict")


class ModelInfo(BaseModel):
    name: str
    labels: list[str]
    input_size: int
    in_chans: int
    threshold: float | None = Field(description="on P(positive_label); null with > 2 classes")
    positive_label: str | None = Field(description="the label predicted when its probability "
                                       "reaches the threshold; null with > 2 classes")
    temperature: float
    bias: list[float] = Field(description="added per class after the temperature; [] for none")
    threshold_chosen_on: str
    backend: str
    gradcam: bool = Field(description="whether ?cam=true is available (PyTorch backend)")
    max_upload_mb: float
    weights_sha256: str | None = Field(description="the served weights' digest, as the run's "
                                       "metrics.json and an export's model.json name it")
    intended_use: str


class PredictResult(BaseModel):
    filename: str | None
    label: str
    probabilities: dict[str, float]
    threshold: float | None
    positive_label: str | None
    warning: str | None = Field(None, description="set when the image is hardly a chest film "
                                "(a thumbnail, a strip, blank): the label is unreliable")
    cam_png: str | None = Field(None, description="base64 PNG: Grad-CAM over the film (?cam)")
    weights_sha256: str | None = Field(None, description="the model that answered (as /model)")


class Problem(BaseModel):
    detail: str


async def _one_file(request: Request) -> None:
    """One film per request: with several in the `file` field FastAPI would silently answer
    for the last one. (The form is already parsed by then; this reads FastAPI's copy.)"""
    sent = (await request.form()).getlist("file")
    if len(sent) > 1:
        raise HTTPException(422, f"{len(sent)} files were sent in the field 'file'; send one "
                                 f"per request. {HOW_TO_POST}")


class UploadLimit:
    """ASGI middleware: 413 for a body over `max_bytes`, without reading the rest of it.

    A declared Content-Length over the cap fails on the first read; a chunked
    body fails as soon as the bytes received pass it. The HTTPException goes
    through FastAPI's handlers, so the answer is JSON like every other error.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        received = 0
        too_large = HTTPException(413, f"upload too large: this server takes at most "
                                       f"{self.max_bytes / 2**20:g} MB (cxr serve --max-upload-mb)")

        async def limited_receive():
            nonlocal received
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise too_large
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise too_large
            return message

        await self.app(scope, limited_receive, send)


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")  # and any other 127.x.y.z address
DEFAULT_PORTS = {"http": 80, "https": 443}


class SameSiteOnly:
    """ASGI middleware against other web pages. A browser lets any page POST a form to
    127.0.0.1 (no preflight needed), and a page can rebind its own DNS name to this server.
    So 403 for a POST whose Origin is another site than the one it is sent to (curl and
    scripts send no Origin) unless it is one of `origins`, and, given `hosts`, for a Host
    header naming another host. Behind a reverse proxy: `hosts` the public name the proxy
    passes on, `origins` the public site when the proxy sends its own Host instead."""

    def __init__(self, app, hosts: Sequence[str] | None, origins: Sequence[str] = ()):
        self.app = app
        self.hosts = None if hosts is None else {_normal(h) for h in hosts}
        self.origins = {_site(o) for o in origins}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        origin = headers.get(b"origin", b"").decode("latin-1")
        problem = None
        # a container's probe names the pod by its address: /health, which tells nothing
        # a rebound page could use, answers any Host (it was 403 behind --allowed-host)
        probe = scope["path"] == "/health" and scope["method"] in ("GET", "HEAD")
        if self.hosts is not None and not probe and not _host_allowed(_split_host(host)[0],
                                                                      self.hosts):
            problem = (f"this server answers requests for {', '.join(sorted(self.hosts))} "
                       f"only, not {host!r}: open it as http://127.0.0.1:PORT/, or behind a "
                       "proxy start it with `cxr serve --allowed-host NAME` (Python: "
                       "create_app(..., hosts=[NAME]))")
        elif origin and scope["method"] not in ("GET", "HEAD") and \
                _site(origin, strict=False) not in self.origins and not _same_site(origin, host):
            problem = (f"a page from {origin} may not send films to this server; use its own "
                       "page, a client that sends no Origin (curl, Python), or behind a proxy "
                       "start it with `cxr serve --allowed-origin ORIGIN`")
        if problem:
            return await JSONResponse({"detail": problem}, status_code=403)(scope, receive, send)
        return await self.app(scope, receive, send)


def _normal(name: str) -> str:
    """Host names compare without case or a trailing dot (LOCALHOST, localhost.)."""
    return name.lower().rstrip(".")


def _split_host(host: str) -> tuple[str, int | None]:
    """'127.0.0.1:8000' -> ('127.0.0.1', 8000); '[::1]' -> ('::1', None)."""
    parts = urlsplit(f"//{host}")
    try:
        port = parts.port
    except ValueError:  # not a number
        port = None
    return _normal(parts.hostname or ""), port


def is_loopback(name: str) -> bool:
    """localhost, 127.x.y.z, ::1 (and ::ffff:127.x.y.z)."""
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return name == "localhost"
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or address).is_loopback


def _host_allowed(name: str, hosts: set[str]) -> bool:
    return name in hosts or (is_loopback(name) and any(is_loopback(h) for h in hosts))


def _site(origin: str, strict: bool = True) -> tuple[str, str, int | None]:
    """'https://XRAY.example.org.:443/' -> ('https', 'xray.example.org', 443); with
    `strict`, a ValueError for what is not an origin (no http(s) scheme, no host)."""
    parts = urlsplit(origin.strip().lower())
    try:
        port = parts.port or DEFAULT_PORTS.get(parts.scheme)
    except ValueError:  # not a number
        port = -1
    if strict and (parts.scheme not in DEFAULT_PORTS or not parts.hostname or port == -1):
        raise ValueError(f"{origin!r} is not an origin: give the site as its browser names "
                         "it, e.g. https://xray.example.org")
    return parts.scheme, _normal(parts.hostname or ""), port


def _same_site(origin: str, host: str) -> bool:
    """Whether a page at `origin` is this server as addressed by `host`; a port left out is
    its scheme's default on either side."""
    scheme, page_name, page_port = _site(origin, strict=False)
    name, port = _split_host(host)
    return page_name == name and page_port == (port or DEFAULT_PORTS.get(scheme))


async def _validation_problem(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    return JSONResponse(status_code=422, content={
        "detail": f"invalid request ({problems}). {HOW_TO_POST}",
        "errors": jsonable_encoder(exc.errors()),
    })


def _png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=CAM_PNG_COMPRESSION)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def create_app(model_path: str | Path, backend: str | None = None,
               max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
               hosts: Sequence[str] | None = LOOPBACK_HOSTS,
               origins: Sequence[str] = ()) -> FastAPI:
    """The web app for one model (a run folder or an ONNX export folder), loaded once.
    `hosts`: the host names requests may be addressed to (None: any, for a server other
    machines reach by names this one cannot know); `origins`: other sites whose pages may
    POST to it (a reverse proxy's public site). See `SameSiteOnly`."""
    for origin in origins:  # said now: the middleware is built at the first request
        _site(origin)
    predictor = Predictor.load(model_path, backend)
    # Films are decoded and scored on one thread: each thread keeps its own malloc arena,
    # so a decode spread over the 40 request threads would keep up to 40 films' peak memory.
    model_thread = ThreadPoolExecutor(1, thread_name_prefix="cxr-model")
    page = (resources.files("cxrkit.serve") / "static" / "index.html").read_text(encoding="utf-8")
    # FastAPI as it is, but /docs loads Swagger UI from this server instead of a CDN.
    app = FastAPIOffline(title="cxrkit", version=__version__, redoc_url=None,
                         description=f"Chest X-ray classification. {INTENDED_USE} " + HOW_TO_POST)
    app.state.predictor = predictor  # the loaded model, for an application that embeds this
    app.add_middleware(UploadLimit, max_bytes=int(max_upload_mb * 2**20))
    app.add_middleware(SameSiteOnly, hosts=hosts, origins=origins)  # added last: runs first
    app.add_exception_handler(RequestValidationError, _validation_problem)
    errors = {code: {"model": Problem} for code in (400, 413, 415, 422)}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return page

    # `async`: on the event loop, not in the thread pool where /predict waits for the model,
    # so a busy server still answers its liveness probe at once
    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/model")
    async def model_info() -> ModelInfo:
        predictor.follow_calibration()  # a stat: the decision rule /predict now applies
        spec, calibration = predictor.spec, predictor.calibration  # one, taken whole
        return ModelInfo(name=spec.name, labels=predictor.labels, input_size=spec.input_size,
                         in_chans=spec.in_chans, threshold=predictor.threshold(None, calibration),
                         positive_label=predictor.positive_label,
                         temperature=calibration.temperature, bias=calibration.bias,
                         threshold_chosen_on=calibration.chosen_on, backend=predictor.backend,
                         gradcam=predictor.backend == "torch", max_upload_mb=max_upload_mb,
                         weights_sha256=predictor.weights_sha256, intended_use=INTENDED_USE)

    def predict_one(path: Path, cam: bool):  # on model_thread
        [result] = predictor.predict([path])
        return result, predictor.cam_overlays([result])[0] if cam and result.ok else None

    @app.post("/predict", responses=errors, dependencies=[Depends(_one_file)])
    def predict(file: UploadFile = File(..., description="the X-ray: PNG, JPEG or DICOM"),
                cam: bool = Query(False, description="add the Grad-CAM overlay")) -> PredictResult:
        # A plain `def`: FastAPI runs it in its thread pool, where it waits for the model's
        # one thread.
        if cam and predictor.backend != "torch":
            raise HTTPException(400, "this server runs an ONNX export, which has no Grad-CAM: "
                                     "ask without ?cam=true")
        if not file.size:
            raise HTTPException(400, f"{file.filename}: the upload is empty. {HOW_TO_POST}")
        with tempfile.TemporaryDirectory(prefix="cxr-upload-") as tmp:
            # the content says what it is; an unusually written DICOM only its name
            suffix = Path(file.filename or "").suffix.lower()
            path = Path(tmp) / ("upload" + (suffix if suffix in DICOM_SUFFIXES else ""))
            with open(path, "wb") as out:
                shutil.copyfileobj(file.file, out)
            result, overlay = model_thread.submit(predict_one, path, cam).result()
            error = (result.error or "").replace(str(path), "the upload")  # not this server's
            if not result.ok and error.startswith(TOO_MANY_PIXELS):
                raise HTTPException(413, f"{file.filename}: {error}")
            if not result.ok:  # a compressed DICOM's error says itself what to do with it
                hint = "" if "compressed as" in error else \
                    " Send a chest X-ray as PNG, JPEG or DICOM."
                raise HTTPException(415, f"{file.filename}: {error}.{hint}")
            cam_png = _png_base64(overlay) if overlay else None
        return PredictResult(filename=file.filename, label=result.label,
                             probabilities=result.probabilities, threshold=result.threshold,
                             positive_label=predictor.positive_label,
                             warning=result.warning, cam_png=cam_png,
                             weights_sha256=result.weights_sha256)

    return app
