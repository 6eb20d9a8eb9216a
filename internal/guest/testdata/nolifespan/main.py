# An ASGI app that rejects the lifespan scope, as many minimal apps do.
async def app(scope, receive, send):
    assert scope["type"] == "http", "only http is supported"
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"no lifespan here"})
