"""The web app: pages, the JSON API, sessions and security headers; `setup(app)` wires them into the server."""

from __future__ import annotations

import pathlib

import aiohttp_jinja2
import jinja2
from aiohttp import web

from proctor.web import api, pages, samples
from proctor.web.auth import setup_auth

STATIC_DIR = pathlib.Path(__file__).parent / "static"


def setup(app: web.Application) -> None:
    """Install templates, /static/, the auth/CSRF/header middlewares and every page and /api/ route."""
    aiohttp_jinja2.setup(app, loader=jinja2.PackageLoader("proctor.web", "templates"), autoescape=True)
    setup_auth(app)
    app.middlewares.append(api.api_error_middleware)
    app.middlewares.append(pages.page_error_middleware)
    app.router.add_routes(api.routes)
    app.router.add_routes(pages.routes)
    samples.setup(app)
    app.router.add_static("/static/", STATIC_DIR, name="static")


__all__ = ["setup"]
