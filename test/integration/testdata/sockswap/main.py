# A hostile program for the direct HTTP path: it tampers with the host
# directory its HTTP socket lives in (see the gVisor backend's
# httpsock.go). Plain ASGI, no framework.
import json
import os
import urllib.parse

SOCKET_DIR = "/run/aleph-http"
SOCKET = os.path.join(SOCKET_DIR, "asgi.sock")


def swap(kind, target):
    os.unlink(SOCKET)
    if kind == "symlink":
        os.symlink(target, SOCKET)
    elif kind == "fifo":
        os.mkfifo(SOCKET)
    elif kind == "file":
        with open(SOCKET, "w") as f:
            f.write("not a socket")
    else:
        raise ValueError(kind)


def fill():
    files, written, error = 0, 0, None
    chunk = b"x" * 4096
    try:
        for n in range(10000):
            with open(os.path.join(SOCKET_DIR, "fill-%d" % n), "wb") as f:
                files += 1
                for _ in range(256):  # 1 MiB a file
                    f.write(chunk)
                    written += len(chunk)
    except OSError as e:
        error = str(e)
    return {"files": files, "bytes": written, "error": error}


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    query = dict(urllib.parse.parse_qsl(scope.get("query_string", b"").decode()))
    path = scope["path"]
    headers = [(b"content-type", b"application/json")]
    try:
        if path == "/swap":
            swap(query["kind"], query.get("target", ""))
            result = {"ok": True}
            # The host must dial afresh for the next request.
            headers.append((b"connection", b"close"))
        elif path == "/fill":
            result = fill()
        else:
            result = {"ok": True, "socket": os.path.exists(SOCKET)}
    except OSError as e:
        result = {"ok": False, "error": str(e)}
    body = json.dumps(result).encode()
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
