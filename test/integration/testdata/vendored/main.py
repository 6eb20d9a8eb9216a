"""A plain ASGI app that imports the fastapi module it ships itself."""
import json

import fastapi


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = json.dumps({"fastapi": getattr(fastapi, "MARK", "runtime")}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
