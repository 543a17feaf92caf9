"""`llmlab serve`."""

from __future__ import annotations

import argparse
import errno
import socket

from llmlab.cli.common import print_json
from llmlab.errors import UserError


def run(args: argparse.Namespace) -> None:
    """Open a run in the local web app: entropy, generation, attention, shapes, counts, causal tracing, edits."""
    import uvicorn

    from llmlab.machine import pick_device
    from llmlab.run_dir import load_run
    from llmlab.web.app import create_app

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be from 0 to 65535, got {args.port}")
    loaded = load_run(args.run, pick_device(args.device or "cpu"))
    sock = bind(args.host, args.port)  # bound here, so a port in use is one line, not uvicorn's log
    host, port = sock.getsockname()[:2]
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}/"
    if args.json:
        print_json({"url": url, "run": str(args.run)})
    else:
        print(f"llmlab: serving {args.run} at {url} (Ctrl-C stops)", flush=True)
    server = uvicorn.Server(uvicorn.Config(create_app(loaded), log_level="warning", access_log=False))
    server.run(sockets=[sock])


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free one)."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror:
        raise UserError(f"--host {host!r} is not an address of this machine") from None
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(info[4])
    except OSError as e:
        sock.close()
        advice = {errno.EADDRINUSE: "choose another --port", errno.EADDRNOTAVAIL: "choose another --host",
                  errno.EACCES: "ports below 1024 need root; choose another --port"}.get(e.errno, "")  # fmt: skip
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); {advice}".rstrip("; ")) from None
    sock.listen(128)
    return sock


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="a run directory written by `llmlab train`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s; 0 picks a free one)")
    p.add_argument("--device", help="cpu (default), auto (the first of cuda, mps, cpu), cuda or mps")
