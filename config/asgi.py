"""ASGI entry point: HTTP through Django, websockets through Channels (origin-checked), and — on the
embedded default — the in-process scheduler started and stopped with the server's lifespan.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import sys

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402

from config import serverlog  # noqa: E402
from experiment.routing import websocket_urlpatterns  # noqa: E402
from experiment.scheduling import runner  # noqa: E402

serverlog.install()


class Lifespan:
    """Handles ASGI ``lifespan``: runs the in-process scheduler while the server runs."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)
        task = None
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                # The consumers' database work runs on this loop's default executor (docs/deployment.md).
                asyncio.get_running_loop().set_default_executor(concurrent.futures.ThreadPoolExecutor(
                    settings.PARTNERLAB_WEB_DB_THREADS, thread_name_prefix="web-db"))
                sys.setswitchinterval(settings.PARTNERLAB_WEB_SWITCH_INTERVAL)
                if settings.PARTNERLAB_SCHEDULER == "inprocess":
                    task = asyncio.create_task(runner.run())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                await send({"type": "lifespan.shutdown.complete"})
                return


application = Lifespan(ProtocolTypeRouter({
    "http": django_asgi_app,
    "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
}))
