"""The HTTP endpoints, one module per concern: ``completions`` and ``chat`` (generation,
both through the shared path in ``generate``) and ``admin`` (models, health, metrics,
load). Each exports an ``APIRouter``; :data:`ROUTERS` is what ``build_app`` includes."""

from __future__ import annotations

from fbjax.serve.routes import admin, chat, completions

ROUTERS = (completions.router, chat.router, admin.router)
