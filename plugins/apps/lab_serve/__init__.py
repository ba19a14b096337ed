"""`lab serve`: a web page and an OpenAI-compatible API for trained runs. A plugin, not the core,
because it needs a web server (the `serve` extra: FastAPI and uvicorn) that training never does."""

from lab import hookimpl
from lab.plugins import lazy_command


@hookimpl
def lab_commands(subparsers):
    p = subparsers.add_parser("serve", help="serve run folders: a web page and an OpenAI-compatible API")
    p.add_argument(
        "paths",
        nargs="+",
        metavar="RUN_DIR|RUNS_FOLDER",
        help="run folders, or folders whose subfolders are run folders (e.g. runs/)",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="require `Authorization: Bearer KEY` on every API route (default: $LAB_API_KEY)",
    )
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N or mps (default cpu)")
    p.add_argument("--max-models", type=int, default=2, help="models kept in memory at once (default 2)")
    p.add_argument(
        "--max-batch",
        type=int,
        default=16,
        help="requests on one model decoded together as rows of one batch (default 16)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="completions in flight or waiting before new requests get 429 (default 64)",
    )
    p.set_defaults(
        func=lazy_command("lab_serve.server", "serve", needs=("fastapi", "uvicorn"), extra="serve")
    )
