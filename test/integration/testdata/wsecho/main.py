# Echoes websocket messages back, prefixed, and says goodbye on close.
# Plain ASGI: uvicorn serves the websocket protocol.
async def app(scope, receive, send):
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        while True:
            m = await receive()
            if m["type"] == "websocket.disconnect":
                return
            if m.get("text") == "close":
                await send({"type": "websocket.close", "code": 4000})
                return
            if m.get("text") is not None:
                await send({"type": "websocket.send", "text": "echo " + m["text"]})
            else:
                await send({"type": "websocket.send", "bytes": m["bytes"][::-1]})
    elif scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})
