"""`lab serve`: check the arguments, say what is served and to whom, run uvicorn.

FastAPI on uvicorn: a well-kept ASGI stack whose StreamingResponse gives server-sent events, with
request bodies checked by pydantic, which lab already uses for recipes.
"""

from __future__ import annotations

import errno
import os
import socket
import sys

from lab.engine.device import pick_device
from lab.errors import LabError
from lab_serve.api import Limits, make_app
from lab_serve.runs import ModelPool, RunTable

LOCAL = ("127.0.0.1", "localhost", "::1")


def build(
    paths,
    device="cpu",
    max_models=2,
    max_batch=16,
    limits: Limits | None = None,
    api_key=None,
    compile: bool = False,
):
    """The ASGI app serving these run folders (what tests run under uvicorn). compile: the decoding
    step through torch.compile (on in `lab serve`, off here: tests stay fast)."""
    table = RunTable(paths)
    pool = ModelPool(table, device, max_models, max_batch, compile)
    return make_app(table, pool, limits or Limits(), api_key), pool


def serve(args) -> int:
    import uvicorn

    for flag, value in (
        ("--max-models", args.max_models),
        ("--max-batch", args.max_batch),
        ("--max-queue", args.max_queue),
    ):
        if value < 1:
            raise LabError(f"{flag} must be at least 1, got {value}")
    if not 1 <= args.port <= 65535:
        raise LabError(f"--port must be between 1 and 65535, got {args.port}")
    api_key = args.api_key or os.environ.get("LAB_API_KEY") or None
    device = pick_device(args.device, f"--device {args.device}", "use --device cpu")
    app, pool = build(
        args.paths,
        device,
        args.max_models,
        args.max_batch,
        Limits(max_queue=args.max_queue),
        api_key,
        compile=not args.no_compile,
    )
    compiled = "eager decoding (--no-compile)" if args.no_compile else "compiled decoding (torch.compile)"
    try:
        sock = listen(args.host, args.port)  # before any URL is announced: a busy port is one message
        print(f"serving {', '.join(pool.table.runs)} on {device}, {compiled}", file=sys.stderr)
        if args.host not in LOCAL:
            print(
                f"warning: listening on {args.host}, so other machines can reach this server", file=sys.stderr
            )
            if api_key is None:
                print("warning: no --api-key: the API is open to anyone who can reach it", file=sys.stderr)
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(
            f"open http://{host}:{args.port}/ (OpenAI API at http://{host}:{args.port}/v1)", file=sys.stderr
        )
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
        with sock:
            uvicorn.Server(config).run(sockets=[sock])
    finally:
        pool.close()
    return 0


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port and listening, or a LabError that says why not (the port is taken,
    the address is not this machine's, the port needs privileges)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise LabError(f"--host {host}: not an address this machine can listen on ({e})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart at once
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        hints: dict[int | None, str] = {
            errno.EADDRINUSE: "another server is listening there; stop it or choose another --port",
            errno.EACCES: "ports below 1024 need privileges; choose --port 1024 or above",
            errno.EADDRNOTAVAIL: "that address is not one of this machine's; try --host 127.0.0.1",
        }
        hint = hints.get(e.errno, "choose another --host or --port")
        raise LabError(f"cannot listen on {host}:{port}: {e.strerror}; {hint}") from None
    sock.set_inheritable(True)
    return sock
