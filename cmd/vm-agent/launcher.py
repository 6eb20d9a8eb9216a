# Written out and started by vm-agent as:
#   python3 launcher.py ENTRYPOINT SOCKET CODE_DIR
#
# Imports the program's ASGI app and serves it with uvicorn on a unix
# socket. The app is wrapped so that:
#   - lifespan startup/shutdown run for apps that support them, and apps
#     that do not are still served (like uvicorn's lifespan="auto", but
#     decided here so the agent's behaviour does not depend on the uvicorn
#     version of the runtime);
#   - an unhandled exception answers 500 with the traceback as text/plain,
#     which aleph-vm users rely on to debug programs they cannot log into.
import asyncio
import importlib
import inspect
import logging
import os
import sys
import traceback

log = logging.getLogger("aleph.launcher")

# Responses with this status are held back until the app returns, so the
# generic 500 of frameworks (Starlette sends it, then re-raises) can be
# replaced by the traceback. Past this size they are let through as is.
HOLD_LIMIT = 1 << 20


def load_app(entrypoint, code_dir):
    module_name, _, attr = entrypoint.partition(":")
    sys.path.insert(0, code_dir)
    module = importlib.import_module(module_name)
    app = module
    for part in (attr or "app").split("."):
        app = getattr(app, part)
    return app


def as_asgi3(app):
    # ASGI2 apps take the scope first and return a coroutine function; they
    # are told apart the way servers usually do: by what is awaitable.
    if inspect.isclass(app):
        asgi3 = hasattr(app, "__await__")
    elif inspect.isfunction(app):
        asgi3 = asyncio.iscoroutinefunction(app)
    else:
        asgi3 = asyncio.iscoroutinefunction(getattr(app, "__call__", None))
    if asgi3:
        return app
    from uvicorn.middleware.asgi2 import ASGI2Middleware
    return ASGI2Middleware(app)


class Wrapper:
    def __init__(self, app):
        self.app = app
        self.lifespan_queue = None
        self.lifespan_task = None
        self.lifespan_done = None

    async def __call__(self, scope, receive, send):
        kind = scope["type"]
        if kind == "lifespan":
            await self.lifespan(receive, send)
        elif kind == "http":
            await self.http(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def http(self, scope, receive, send):
        held = []
        held_size = 0
        holding = False
        started = False

        async def send_wrapper(message):
            nonlocal holding, held_size, started
            if message["type"] == "http.response.start":
                started = True
                if message.get("status") == 500:
                    holding = True
            if holding:
                held.append(message)
                held_size += len(message.get("body", b""))
                if held_size <= HOLD_LIMIT:
                    return
                holding = False
                for m in held:
                    await send(m)
                held.clear()
                return
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            text = traceback.format_exc()
            print(text, file=sys.stderr, flush=True)
            if started and not holding:
                raise
            body = text.encode()
            await send({
                "type": "http.response.start",
                "status": 500,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                ],
            })
            await send({"type": "http.response.body", "body": body})
            return
        for m in held:
            await send(m)

    async def lifespan(self, receive, send):
        # Runs the app's own lifespan in a task fed through a queue, so an
        # app that rejects the lifespan scope cannot stop the server.
        inner_queue = asyncio.Queue()
        answers = asyncio.Queue()

        async def inner_send(message):
            await answers.put(message)

        async def run_app():
            try:
                await self.app({"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}},
                               inner_queue.get, inner_send)
            except BaseException as e:  # noqa: BLE001 - reported, never fatal
                return e
            return None

        task = None
        supported = True

        async def forward(event, ok, failed):
            nonlocal supported
            await inner_queue.put({"type": event})
            getter = asyncio.ensure_future(answers.get())
            done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                answer = getter.result()
                if answer["type"] == failed:
                    return answer
                return {"type": ok}
            getter.cancel()
            err = task.result()
            supported = False
            if err is not None:
                log.info("ASGI lifespan not supported by the app (%s: %s); serving without it",
                         type(err).__name__, err)
            return {"type": ok}

        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                task = asyncio.ensure_future(run_app())
                answer = await forward("lifespan.startup", "lifespan.startup.complete",
                                       "lifespan.startup.failed")
                await send(answer)
                if answer["type"].endswith("failed"):
                    return
            elif message["type"] == "lifespan.shutdown":
                if supported and task is not None and not task.done():
                    answer = await forward("lifespan.shutdown", "lifespan.shutdown.complete",
                                           "lifespan.shutdown.failed")
                else:
                    answer = {"type": "lifespan.shutdown.complete"}
                await send(answer)
                return


def wait_for_job(socket_path, code_dir):
    """Preload mode: import the heavy modules now, then wait on stdin for
    the program (entrypoint and environment) the agent hands over."""
    import json

    for name in ("uvicorn", "fastapi", "starlette.applications", "pydantic"):
        try:
            __import__(name)
        except Exception:  # a runtime without them still serves other apps
            pass
    line = sys.stdin.readline()
    if not line:
        sys.exit(0)  # no program for us: the agent discarded this interpreter
    job = json.loads(line)
    os.environ.clear()
    os.environ.update(job["env"])
    # Code that ships its own copy of a module imported above (a vendored
    # FastAPI, say) must get its copy: start afresh, same process, same
    # pipes, with the program's environment.
    shadowed = sorted(n for n in top_level_names(code_dir) if n in sys.modules)
    if shadowed:
        print("launcher: the code provides %s; starting a fresh interpreter" % ", ".join(shadowed),
              file=sys.stderr, flush=True)
        os.execv(sys.executable, [sys.executable, os.path.abspath(__file__),
                                  job["entrypoint"], socket_path, code_dir])
    return job["entrypoint"], socket_path, code_dir


def top_level_names(code_dir):
    """Names importable from the top of code_dir: packages and modules."""
    try:
        entries = os.listdir(code_dir)
    except OSError:
        return set()
    names = set()
    for entry in entries:
        if os.path.isdir(os.path.join(code_dir, entry)):
            names.add(entry)
        elif entry.endswith((".py", ".pyc", ".so")):
            names.add(entry.split(".", 1)[0])
    return names


def main():
    if sys.argv[1] == "--preload":
        entrypoint, socket_path, code_dir = wait_for_job(*sys.argv[2:4])
    else:
        entrypoint, socket_path, code_dir = sys.argv[1:4]
    # Our own handler only: uvicorn configures its loggers itself and a root
    # handler would print each of its lines twice.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: launcher: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    os.chdir(code_dir)
    app = load_app(entrypoint, code_dir)

    import uvicorn

    config = uvicorn.Config(
        Wrapper(as_asgi3(app)),
        uds=socket_path,
        interface="asgi3",
        lifespan="on",
        log_level="info",
        # Longer than the host's idle timeout, so the host closes idle
        # connections first and never reuses one uvicorn is closing.
        timeout_keep_alive=75,
        # Only the agent can reach the socket: trust its forwarded headers.
        forwarded_allow_ips="*",
        server_header=False,
        # The supervisor logs every request; an access log line here would
        # cost a write and a relay through the agent per request, which
        # under gVisor's ptrace platform is a measurable share of latency.
        access_log=False,
    )
    server = uvicorn.Server(config)
    server.run()
    # A failed lifespan startup makes uvicorn return instead of serving.
    if not server.started:
        sys.exit(3)


if __name__ == "__main__":
    main()
