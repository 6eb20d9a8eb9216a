# Written out and started by vm-agent as:
#   python3 launcher.py ENTRYPOINT SOCKET CODE_DIR
#
# Imports the program's ASGI app and serves it on a unix socket: with
# uvicorn when the runtime has it, else with asgi_server.py (written beside
# this file), a standard-library server, as aleph-vm's official runtimes
# have no uvicorn. The app is wrapped so that:
#   - lifespan startup/shutdown run for apps that support them, and apps
#     that do not are still served (like uvicorn's lifespan="auto", but
#     decided here so the agent's behaviour does not depend on the uvicorn
#     version of the runtime);
#   - an unhandled exception answers 500 with the traceback as text/plain,
#     which aleph-vm users rely on to debug programs they cannot log into;
#   - a request bearing the execution's event token (given by the host in
#     EVENT_TOKEN_VAR, removed from the program's environment) is an Aleph
#     message for the program: it is handed over as aleph-vm's runtime
#     does, as an ASGI scope {"type": "aleph.message"} whose receive()
#     answers {"type": "aleph.message", "body": <message JSON str>}.
# A program that cannot start (its import raises, its lifespan startup
# fails) leaves its traceback in START_ERROR beside this file: the agent
# hands it to the supervisor, which answers it, as aleph-vm does.
import asyncio
import hmac
import importlib
import importlib.machinery
import importlib.util
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

# Where a dependency volume is usually mounted; aleph-vm puts it on
# sys.path right after the code, ahead of the runtime's own packages.
PACKAGES_DIR = "/opt/packages"
START_ERROR = "start-error.txt"
EVENT_TOKEN_VAR = "_ALEPH_EVENT_TOKEN"
EVENT_TOKEN_HEADER = b"aleph-event-token"
HERE = os.path.dirname(os.path.abspath(__file__))


def report_start_failure(text):
    print(text, file=sys.stderr, flush=True)
    path = os.path.join(HERE, START_ERROR)
    try:
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    except OSError as e:
        log.warning("could not record the start failure: %s", e)


def set_import_path(code_dir):
    # The launcher's own directory is not the program's business (a module
    # of the program named like ours must win).
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
    sys.path[0:0] = [code_dir, PACKAGES_DIR]


def load_app(entrypoint, code_dir):
    module_name, sep, attr = entrypoint.partition(":")
    if not sep:
        return load_plain(entrypoint, code_dir)
    module = importlib.import_module(module_name)
    app = module
    for part in (attr or "app").split("."):
        app = getattr(app, part)
    return app


def load_plain(name, code_dir):
    """Plain code with an entrypoint that names the app, as aleph-vm's
    runtimes take it: the single source file (stored under that name) is
    run as a module and the app is its attribute of that name."""
    path = os.path.join(code_dir, name)
    if not os.path.isfile(path):
        files = [f for f in os.listdir(code_dir) if os.path.isfile(os.path.join(code_dir, f))]
        if len(files) != 1:
            raise FileNotFoundError("plain code: no file %s in %s" % (name, code_dir))
        path = os.path.join(code_dir, files[0])
    loader = importlib.machinery.SourceFileLoader("main", path)
    spec = importlib.util.spec_from_loader("main", loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules["main"] = module
    loader.exec_module(module)
    return getattr(module, name)


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

    async def asgi2(scope, receive, send):
        await app(scope)(receive, send)

    return asgi2


class Wrapper:
    def __init__(self, app, on_startup_failed, event_token=None):
        self.app = app
        self.on_startup_failed = on_startup_failed
        self.event_token = (event_token or "").encode()
        self.lifespan_queue = None
        self.lifespan_task = None
        self.lifespan_done = None

    async def __call__(self, scope, receive, send):
        kind = scope["type"]
        if kind == "lifespan":
            await self.lifespan(scope, receive, send)
        elif kind == "http":
            if self.is_event(scope):
                await self.event(receive, send)
            else:
                await self.http(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def is_event(self, scope):
        if not self.event_token:
            return False
        for name, value in scope.get("headers", ()):
            if name.lower() == EVENT_TOKEN_HEADER:
                return hmac.compare_digest(value, self.event_token)
        return False

    async def event(self, receive, send):
        chunks = []
        while True:
            m = await receive()
            if m["type"] != "http.request":
                return
            chunks.append(m.get("body", b""))
            if not m.get("more_body"):
                break
        body = b"".join(chunks).decode("utf-8", "replace")

        async def event_receive():
            return {"type": "aleph.message", "body": body, "more_body": False}

        sent = []

        async def event_send(message):
            sent.append(message)

        status, ctype = 200, b"application/json"
        try:
            result = await self.app({"type": "aleph.message"}, event_receive, event_send)
            # Some wrappers return the handler's coroutine rather than
            # awaiting it.
            if inspect.isawaitable(result):
                await result
            answer = sent[0] if sent else None
            if isinstance(answer, dict) and "body" in answer and "type" in answer:
                answer = answer["body"]
            if isinstance(answer, (bytes, bytearray)):
                answer = answer.decode("utf-8", "replace")
            import json
            out = json.dumps(answer, default=str).encode()
        except Exception:
            text = traceback.format_exc()
            print(text, file=sys.stderr, flush=True)
            status, ctype, out = 500, b"text/plain; charset=utf-8", text.encode()
        await send({
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", ctype), (b"content-length", str(len(out)).encode())],
        })
        await send({"type": "http.response.body", "body": out})

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

    async def lifespan(self, outer_scope, receive, send):
        # Runs the app's own lifespan in a task fed through a queue, so an
        # app that rejects the lifespan scope cannot stop the server. An
        # app that raises before taking the startup event does not support
        # lifespan; one that raises after it failed its startup.
        inner_queue = asyncio.Queue()
        answers = asyncio.Queue()
        took_event = False

        async def inner_receive():
            nonlocal took_event
            took_event = True
            return await inner_queue.get()

        async def inner_send(message):
            await answers.put(message)

        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"},
                 "state": outer_scope.get("state", {})}

        async def run_app():
            try:
                await self.app(scope, inner_receive, inner_send)
            except BaseException as e:  # noqa: BLE001 - reported, never fatal
                return e, traceback.format_exc()
            return None, None

        task = None
        supported = True

        async def forward(event, ok, failed):
            nonlocal supported
            await inner_queue.put({"type": event})
            getter = asyncio.ensure_future(answers.get())
            done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            answer = None
            if getter in done:
                answer = getter.result()
            else:
                # The app ended; what it sent just before is still queued.
                getter.cancel()
                try:
                    answer = answers.get_nowait()
                except asyncio.QueueEmpty:
                    pass
            if answer is not None:
                if answer["type"] == failed:
                    return answer
                return {"type": ok}
            err, text = task.result()
            if err is not None and took_event:
                return {"type": failed, "message": text}
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
                if answer["type"].endswith("failed"):
                    self.on_startup_failed(answer.get("message") or "ASGI lifespan startup failed")
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
    import time

    began = time.monotonic()
    # Beyond the frameworks: what uvicorn imports only when it starts
    # serving (its protocol, lifespan and loop modules), and aiohttp, which
    # Aleph programs use to reach the API. Under emulation (QEMU TCG) each
    # of these costs a noticeable share of a cold start.
    for name in ("uvicorn", "fastapi", "fastapi.responses", "starlette.applications", "pydantic",
                 "uvicorn.protocols.http.auto", "uvicorn.protocols.websockets.auto",
                 "uvicorn.lifespan.on", "uvicorn.loops.auto", "aiohttp"):
        try:
            __import__(name)
        except Exception:  # a runtime without them still serves other apps
            pass
    # The operator (and the tests) can tell when a spare is fully warm.
    print("launcher: preloaded in %.1fs; waiting for a program" % (time.monotonic() - began),
          file=sys.stderr, flush=True)
    # The agent hears it too, through the pipe it gave us, and tells the
    # host that this sandbox no longer keeps a core busy.
    warm_fd = os.environ.get("ALEPH_AGENT_WARM_FD")
    if warm_fd:
        try:
            os.write(int(warm_fd), b"w")
            os.close(int(warm_fd))
        except (OSError, ValueError):
            pass
    line = sys.stdin.readline()
    if not line:
        sys.exit(0)  # no program for us: the agent discarded this interpreter
    job = json.loads(line)
    reseed()
    os.environ.clear()
    os.environ.update(job["env"])
    # Code that ships its own copy of a module imported above (a vendored
    # FastAPI, say) must get its copy: start afresh, same process, same
    # pipes, with the program's environment.
    shadowed = sorted(n for n in top_level_names(code_dir) | top_level_names(PACKAGES_DIR)
                      if n in sys.modules)
    if shadowed:
        print("launcher: the program provides %s; starting a fresh interpreter" % ", ".join(shadowed),
              file=sys.stderr, flush=True)
        os.execv(sys.executable, [sys.executable, os.path.abspath(__file__),
                                  job["entrypoint"], socket_path, code_dir])
    return job["entrypoint"], socket_path, code_dir


def reseed():
    """This interpreter may be one of many restored from the same checkpoint
    (the host's snapshots of warm spares): whatever was drawn from the
    kernel's generator before the checkpoint and kept is the same in all of
    them, and would be known to every other program restored from it. Draw
    it again, from the kernel's generator, which is not in the image. Only
    for modules already imported: one imported later draws its own.

    What cannot be drawn again in a running interpreter is accepted: the
    str/bytes hash seed (it only decides dict and set layouts; knowing it
    helps flood one's own program's dicts with colliding keys) and the
    memory layout (ASLR). The spare holds no program, code or secret at the
    checkpoint."""
    mods = sys.modules
    # The random module's global generator (random.random, choice, ...).
    if "random" in mods:
        mods["random"].seed()
    # multiprocessing's authentication key, drawn when multiprocessing.process
    # is imported and inherited by its children: it authenticates their
    # connections (Listener/Client, managers).
    if "multiprocessing.process" in mods:
        mods["multiprocessing.process"].current_process().authkey = os.urandom(32)
    # tempfile's name generator: a random.Random of its own, made on first
    # use and made again only in another process id (a restore keeps it).
    if "tempfile" in mods:
        mods["tempfile"]._name_sequence = None
    # aiohttp's websocket client masks: WebSocketWriter's default random
    # argument is one random.Random made when aiohttp.http_websocket was
    # imported (aiohttp 3.8; later versions may draw otherwise).
    writer = getattr(mods.get("aiohttp.http_websocket"), "WebSocketWriter", None)
    defaults = getattr(getattr(writer, "__init__", None), "__kwdefaults__", None) or {}
    if hasattr(defaults.get("random"), "seed"):
        defaults["random"].seed()
    # OpenSSL's generator (ssl.RAND_bytes, TLS handshakes' randoms and
    # ephemeral keys) keeps its state in the process: add fresh entropy,
    # which reseeds its primary generator and so the ones drawn from it.
    if "ssl" in mods:
        mods["ssl"].RAND_add(os.urandom(48), 48.0)


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
    # First, so that a uvicorn the program ships is the one that serves.
    set_import_path(code_dir)
    try:
        import uvicorn
    except ImportError:
        uvicorn = None
    server_module = None
    if uvicorn is None:
        # Loaded by path and under a name of its own: the launcher's
        # directory is no longer on sys.path.
        spec = importlib.util.spec_from_file_location("_aleph_asgi_server", os.path.join(HERE, "asgi_server.py"))
        server_module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(server_module)
    event_token = os.environ.pop(EVENT_TOKEN_VAR, None)
    try:
        app = as_asgi3(load_app(entrypoint, code_dir))
    except BaseException:
        report_start_failure(traceback.format_exc())
        sys.exit(3)
    wrapped = Wrapper(app, report_start_failure, event_token)

    if server_module is not None:
        sys.exit(server_module.serve(wrapped, socket_path, lambda text: None))

    config = uvicorn.Config(
        wrapped,
        uds=socket_path,
        interface="asgi3",
        lifespan="on",
        log_level="info",
        # Longer than the host's idle timeout, so the host closes idle
        # connections first and never reuses one uvicorn is closing.
        timeout_keep_alive=75,
        # Only the host (the supervisor's proxy, or the agent) reaches the
        # socket: trust its forwarded headers.
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
