"""A raw ASGI app (standard library only) for the launcher's tests."""
import asyncio
import hashlib
import json
import os
import sys

state = {"startup": False, "disconnects": 0}


async def body_of(receive):
    chunks = []
    while True:
        m = await receive()
        if m["type"] == "http.disconnect":
            return None
        chunks.append(m["body"])
        if not m.get("more_body"):
            return b"".join(chunks)


async def json_response(send, status, obj):
    body = json.dumps(obj).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            m = await receive()
            if m["type"] == "lifespan.startup":
                if os.environ.get("FAIL_STARTUP"):
                    raise RuntimeError("startup failed on purpose")
                state["startup"] = True
                await send({"type": "lifespan.startup.complete"})
            elif m["type"] == "lifespan.shutdown":
                print("asgi-test: shutdown ran", flush=True)
                await send({"type": "lifespan.shutdown.complete"})
                return
    path = scope["path"]
    if path == "/":
        await json_response(send, 200, {
            "startup": state["startup"], "method": scope["method"], "path": path,
            "query": scope["query_string"].decode(), "http_version": scope["http_version"],
            "client": scope["client"], "scheme": scope["scheme"],
            "sys_path": sys.path[:3],
        })
    elif path == "/echo":
        body = await body_of(receive)
        await json_response(send, 200, {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()})
    elif path == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        for i in range(3):
            await send({"type": "http.response.body", "body": b"chunk %d\n" % i, "more_body": True})
            await asyncio.sleep(0.3)
        await send({"type": "http.response.body", "body": b""})
    elif path == "/forever":
        # Streams until the client goes away, then counts the disconnect.
        await send({"type": "http.response.start", "status": 200, "headers": []})
        waiter = asyncio.ensure_future(body_of(receive))
        await waiter  # the (empty) request body
        gone = asyncio.ensure_future(receive())
        while not gone.done():
            await send({"type": "http.response.body", "body": b"tick\n", "more_body": True})
            await asyncio.sleep(0.05)
        if gone.result()["type"] == "http.disconnect":
            state["disconnects"] += 1
    elif path == "/disconnects":
        await json_response(send, 200, {"disconnects": state["disconnects"]})
    elif path == "/raise":
        raise ValueError("raised on purpose by /raise")
    else:
        await json_response(send, 404, {"path": path})
