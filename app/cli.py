"""The showing command of the root CLI, beside the dashboard it starts: ``flatlora app [RUNS_DIR]``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from flatlora.config import BASE_DTYPES
from flatlora.errors import FlatLoraError


def app_command(runs: str, port: int, host: str, dtype: str | None = None, max_memory: str | None = None) -> list[str]:
    """The ``streamlit run`` command line of the dashboard on ``runs``.

    ``dtype`` (the base weights') and ``max_memory`` (the graphs' budget) apply to measures computed on request.
    """
    import importlib.util

    spec = importlib.util.find_spec("flatlora_app")
    if spec is None or spec.origin is None or importlib.util.find_spec("streamlit") is None:
        raise FlatLoraError("the dashboard needs streamlit and the app package: pip install 'flatlora[app]'")
    main = Path(spec.origin).parent / "main.py"
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(main),
        "--server.port",
        str(port),
        "--server.address",
        host,
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--client.toolbarMode",
        "viewer",  # no Deploy button or developer menu: the dashboard is a local tool
        "--",
        "--runs",
        runs,
        *(["--dtype", dtype] if dtype is not None else []),
        *(["--max-memory", max_memory] if max_memory is not None else []),
    ]


def app_address(host: str, port: int) -> int:
    """Check that the dashboard can listen on host:port and return the port (a free one for 0); one-line refusals."""
    import errno
    import socket

    if isinstance(port, bool) or not 0 <= port <= 65535:
        raise FlatLoraError(f"--port {port} is not a port: use 1..65535 (0: any free port)")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except (socket.gaierror, UnicodeError):
        raise FlatLoraError(f"--host {host!r} does not resolve to an address of this machine: use 127.0.0.1") from None
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Streamlit's server binds
        try:
            probe.bind((host, port))
        except PermissionError:
            raise FlatLoraError(f"--port {port} needs privileges here: use a port above 1023") from None
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise FlatLoraError(
                    f"port {port} on {host} is in use: pass another --port, or stop what listens there"
                ) from None
            raise FlatLoraError(f"--host {host}: cannot listen there ({err.strerror}): use 127.0.0.1") from None
        return probe.getsockname()[1]


def _app(args: argparse.Namespace) -> int:
    """Validate the folder, host and port, then become the Streamlit server (exec): signals reach it directly,
    so SIGTERM or Ctrl-C to ``flatlora app`` ends the server and frees the port; no child is left behind."""
    root = Path(args.runs)
    if not root.exists():
        raise FlatLoraError(f"{args.runs} does not exist: pass a folder of runs (flatlora demo writes runs/demo)")
    if not root.is_dir():
        raise FlatLoraError(f"{args.runs} is a file: pass the folder that holds the run directories")
    port = app_address(args.host, args.port)
    from flatlora_analysis.memory import parse_memory

    parse_memory(args.max_memory)  # a bad size is refused before the server starts
    cmd = app_command(str(root.resolve()), port, args.host, args.dtype, args.max_memory)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"flatlora app: http://{host}:{port} on {args.runs} (Ctrl-C stops it)", flush=True)
    sys.stderr.flush()
    if os.name == "nt":  # no exec on Windows: a child, waited for
        import subprocess

        try:
            return subprocess.call(cmd)
        except KeyboardInterrupt:
            return 0
    os.execv(cmd[0], cmd)
    return 0  # not reached


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``app`` on the root CLI's subcommands."""
    app = sub.add_parser(
        "app",
        help="the Streamlit dashboard over a folder of runs",
        description="Start the dashboard (runs, landscapes, curvature, sharpness vs generalization, report) on a "
        "folder of runs. It binds to 127.0.0.1 unless --host says otherwise.",
    )
    app.add_argument("runs", nargs="?", default="runs/demo", help="folder of runs (default: runs/demo)")
    app.add_argument("--port", type=int, default=8501, help="port (default 8501)")
    app.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    app.add_argument(
        "--dtype",
        choices=BASE_DTYPES,
        default=None,
        help="dtype of the frozen base weights for measures computed on request (default: each run's own); the "
        "LoRA factors and the measured spaces stay float32, and results are stored apart per dtype",
    )
    app.add_argument(
        "--max-memory",
        default="auto",
        help="memory for the autograd graphs of measures computed on request, e.g. 6GB (default auto: a share of "
        "the memory free at the first measure)",
    )
    app.set_defaults(func=_app)
