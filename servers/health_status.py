"""The standard `grpc.health.v1` service, with watch streams that end when the server shuts down.

Every `RemoteTeacher` keeps a `Watch` stream open per replica to learn when it stops serving. Such a stream
never finishes by itself, so a graceful stop would wait the whole grace period for it and then cut it off
like a failed call. `close_watches()` ends them cleanly (status OK) after clients have seen NOT_SERVING,
right before the server stops accepting calls; the clients' watchers then simply reconnect or give up.
"""

from __future__ import annotations

import asyncio
import contextlib

from grpc_health.v1 import health


class DrainableHealthServicer(health.aio.HealthServicer):
    def __init__(self) -> None:
        super().__init__()
        self._closing = asyncio.Event()

    async def Watch(self, request, context) -> None:
        watch = asyncio.ensure_future(super().Watch(request, context))
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({watch, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (watch, closing):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def close_watches(self) -> None:
        self._closing.set()
