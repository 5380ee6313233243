"""create_app: the Flask application with its OpenAPI docs and JSON errors."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from apispec import APISpec
from flask import Flask, Response, g, request, send_from_directory
from flask_smorest import Api, Blueprint
from werkzeug.exceptions import HTTPException, InternalServerError
from werkzeug.routing import Rule

import mflux_server.web
from mflux_server import __version__, store
from mflux_server.api import (
    acedata,
    auth,
    context,
    events,
    generation,
    info,
    metrics,
    models,
    nebula,
    openai_images,
    original_models,
    origins,
    tasks,
    upscaling,
)
from mflux_server.api.errors import ErrorSchema, JsonError, error_payload, in_envelope
from mflux_server.api.generation_schemas import openapi_rules
from mflux_server.api.request_body import refuse_odd_paths
from mflux_server.core.settings import Settings
from mflux_server.store import storage_problem

WEB = str(Path(mflux_server.web.__file__).parent)  # the web UI's files

log = logging.getLogger("mflux_server")

API_DESCRIPTION = """\
A queue in front of one GPU per worker. Submit a prompt with `POST /api/generate`, poll
`GET /api/status` for the position, progress and forecast wait, then fetch the bytes with
`GET /api/image`. `GET /api/models` lists the models, what each accepts (image-to-image, edit, inpaint,
negative prompt, guidance) and which workers serve them. `/generate`, `/status` and `/image` are the same
endpoints without the `/api` prefix,
as in the original mflux-server. Every error is JSON with a stable `code`, a `message` and the `field` at fault.
"""


class JsonErrorApi(Api):
    """flask-smorest's Api with our error body, and an OpenAPI document built on its first use."""

    ERROR_SCHEMA = ErrorSchema

    def __init__(self, app: Flask) -> None:
        # Documenting the views is about half of an app's start, and most processes never serve the docs.
        self._pending_docs: list[Callable[[], None]] = []
        self._docs_lock = threading.Lock()
        self._docs_builder: int | None = None
        self._spec: APISpec | None = None
        super().__init__(app)

    @property
    def spec(self) -> APISpec | None:
        """The OpenAPI document, with every view registered so far documented in it."""
        if self._pending_docs and self._docs_builder != threading.get_ident():
            with self._docs_lock:
                self._docs_builder = threading.get_ident()  # the jobs read self.spec: they get the one being built
                try:
                    while self._pending_docs:
                        self._pending_docs[0]()
                        del self._pending_docs[0]  # after the job: another thread waits until the last is done
                finally:
                    self._docs_builder = None
        return self._spec

    @spec.setter
    def spec(self, value: APISpec | None) -> None:
        self._spec = value

    def _register_responses(self) -> None:
        self._pending_docs.append(super()._register_responses)

    def _register_etag_headers(self) -> None:
        self._pending_docs.append(super()._register_etag_headers)

    def _register_pagination_header(self) -> None:
        self._pending_docs.append(super()._register_pagination_header)

    def register_blueprint(self, blp: Blueprint, *, parameters: Any = None, **options: Any) -> None:
        """Register a blueprint's views now and document them when the document is first read."""
        name = options.get("name", blp.name)
        self._app.extensions["flask-smorest"]["blp_name_to_api"][name] = self
        self._app.register_blueprint(blp, **options)

        def document() -> None:
            blp.register_views_in_doc(self, self._app, self._spec, name=name, parameters=parameters)
            self._spec.tag({"name": name, "description": blp.description})  # type: ignore[union-attr]

        self._pending_docs.append(document)

    def handle_http_exception(self, error: HTTPException) -> JsonError:
        """Render any HTTP error as our JSON error body; a 5xx a view chose (504 timeout, 500 generation_failed,
        503 server_stopping) is logged with its message."""
        answer = error_payload(error)
        if answer[1] >= 500:
            log.warning("%s %s answered %d %s: %s", request.method, request.path, answer[1], answer[0]["code"],
                        answer[0]["message"])
        return in_envelope(answer)


class LazyBuilderRule(Rule):
    """werkzeug's Rule with its URL builders compiled on first use: a rule is matched far more often than built
    (url_for), and compiling two builders per rule is most of what adding the routes costs."""

    def _compile_builder(self, append_unknown: bool = True) -> Callable[..., tuple[str, str]]:
        compiled: list[Callable[..., tuple[str, str]]] = []

        def build(rule: Rule, **values: Any) -> tuple[str, str]:
            if not compiled:
                compiled.append(Rule._compile_builder(rule, append_unknown).__get__(rule, None))
            return compiled[0](**values)

        return build


# What each storage problem answers: HTTP status, code, and what to tell the client.
STORAGE_ANSWERS = {
    "full": (507, "storage_full", "the queue's disk is full, so nothing can be stored; free space and retry"),
    "read_only": (503, "storage_read_only", "the queue file cannot be written (read-only file or file system)"),
    "lost": (503, "storage_lost", "the queue file or its WAL was removed or replaced under the running server"),
    "busy": (503, "storage_busy", "the queue is locked by another process; retry in a moment"),
    "io": (503, "storage_failed", "the queue file could not be read or written (an I/O error)"),
    "corrupt": (503, "storage_failed", "the queue file is damaged or is not an SQLite database"),
}


def storage_error(problem: str, error: BaseException, path: str) -> JsonError:
    """A storage fault as JSON: nothing was acknowledged that is not stored, and the log names the file.

    The answer says what became of the request: a task already committed is named (with how to follow it); a
    write cut off with the connection (PostgreSQL) may or may not have committed, and the answer says so and how
    to find out; otherwise the request was not carried out."""
    status, code, message = STORAGE_ANSWERS[problem]
    log.error("queue %s: %s (%s: %s)", path, message, type(error).__name__, error)
    payload: dict[str, Any] = {"code": code, "field": None}
    committed = g.get("committed_task_id")  # called from the error handler, inside the failed request
    if committed is not None:
        payload["task_id"] = committed
        payload["message"] = (f"the task was queued as {committed} (GET /api/status?task_id={committed}), but the "
                              f"answer could not be completed: {message}")
    elif problem in ("io", "lost") and store.capabilities_of(path).outcome_unknown_when_cut and request.method == "POST":
        payload["message"] = (f"{message}; the connection was cut mid-write, so the request may or may not have been "
                              "carried out: send it again with the same Idempotency-Key header to get the task it "
                              "created, if it did")
    else:
        payload["message"] = f"{message}; the request was not carried out"
    return in_envelope((payload, status, {"Retry-After": "5"} if problem in ("busy", "full") else {}))


def create_app(config: Settings | None = None, overrides: dict[str, Any] | None = None) -> Flask:
    """Build the API app for a settings object; migrates the database first."""
    config = config or Settings()
    app = Flask("mflux_server")
    app.url_rule_class = LazyBuilderRule
    app.config.update(
        API_TITLE="mflux-server",
        API_VERSION=__version__,
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH="/swagger",
        OPENAPI_SWAGGER_UI_URL="/swagger-assets/",
        API_SPEC_OPTIONS={"info": {"description": API_DESCRIPTION}},
        MAX_CONTENT_LENGTH=1 << 20,
        JSON_SORT_KEYS=False,
    )
    app.config.update(overrides or {})
    context.init_app(app, config)
    origins.init_app(app)  # first: a request for another Host or from a refused page goes no further
    app.url_map.merge_slashes = False  # "/api//status" is no path of ours, not a redirect to one
    app.before_request(lambda: refuse_odd_paths(request))  # before auth reads a key or a store sees a task id
    auth.init_app(app)

    api = JsonErrorApi(app)
    api.ma_plugin.converter.add_attribute_function(openapi_rules(config))
    api.register_blueprint(generation.blp, url_prefix="/api")
    api.register_blueprint(upscaling.blp, url_prefix="/api")
    # The original mflux-server's paths, for its clients: the same views without the /api prefix.
    api.register_blueprint(generation.blp, url_prefix="", name="original-paths")
    api.register_blueprint(tasks.blp, url_prefix="/api")
    api.register_blueprint(info.blp, url_prefix="/api")
    api.register_blueprint(info.health, url_prefix="")
    api.register_blueprint(metrics.blp, url_prefix="")
    api.register_blueprint(models.blp, url_prefix="/api")
    api.register_blueprint(original_models.blp, url_prefix="/api")
    api.register_blueprint(events.blp, url_prefix="/api")
    # The compatible surfaces: thin translations onto the same queue.
    api.register_blueprint(openai_images.blp, url_prefix="/v1")
    api.register_blueprint(acedata.blp, url_prefix="/flux")
    api.register_blueprint(nebula.blp, url_prefix="/api/v1/images")

    @app.route("/")
    def web_ui() -> Response:
        """The web UI: one page from the package's files, no CDN."""
        return send_from_directory(WEB, "index.html", max_age=0)

    @app.route("/ui/<path:filename>")
    def web_assets(filename: str) -> Response:
        """The web UI's script and style sheet."""
        return send_from_directory(WEB, filename, max_age=0)

    @app.route("/swagger-assets/<path:filename>")
    def swagger_assets(filename: str) -> Response:
        """Swagger UI's files, served from the swagger-ui-bundle package so the docs work offline."""
        from swagger_ui_bundle import swagger_ui_path

        return send_from_directory(str(swagger_ui_path), filename, max_age=86400)

    @app.after_request
    def answer_options(response: Response) -> Response:
        """OPTIONS answers 204 with the Allow header and no body (Flask's own answer is an empty text/html 200)."""
        if request.method == "OPTIONS" and response.status_code == 200 and "Allow" in response.headers:
            response.status_code = 204
            response.set_data(b"")
            del response.headers["Content-Type"]
        return response

    @app.errorhandler(Exception)
    def unexpected(error: Exception) -> JsonError:
        """Anything unhandled becomes a logged JSON 500, never an HTML page; storage faults say what they are."""
        if isinstance(error, HTTPException):
            return in_envelope(error_payload(error))
        problem = storage_problem(error)
        if problem is not None:
            return storage_error(problem, error, config.db)
        log.exception("unhandled error")
        return in_envelope(error_payload(InternalServerError()))

    return app
