# Calls the guest API through ALEPH_API_UNIX_SOCKET and returns its answer,
# from a plain ASGI app so the test needs no HTTP client library.
import asyncio
import os


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    reader, writer = await asyncio.open_unix_connection(os.environ["ALEPH_API_UNIX_SOCKET"])
    writer.write(b"GET /properties HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n")
    await writer.drain()
    answer = await reader.read()
    writer.close()
    body = answer.split(b"\r\n\r\n", 1)[1]
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})
