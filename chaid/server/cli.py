"""``chaid serve``: run the daemon in the foreground (systemd or a terminal).

Importing this module is cheap; trio, torch and the store are imported when the command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the caching daemon on a Unix socket",
        description="Run the chaid daemon: a warm model and the latent cache behind a Unix "
        "socket (msgpack-rpc; see docs/protocol.md). Stops cleanly on SIGTERM.",
        epilog="Every setting (docs/deploy.md) is also a TOML key of --config and an "
        "environment variable CHAID_<SECTION>_<KEY>, e.g. CHAID_SERVER_TORCH_THREADS=2: torch "
        "threads, by default 1 for a small model on a CPU (fastest beside other busy "
        "processes) and every core otherwise.",
    )
    p.add_argument("--config", type=Path, help="TOML settings file")
    p.add_argument("--socket", type=Path, help="socket path (default: /run/chaid/chaid.sock)")
    p.add_argument("--data-dir", type=Path,
                   help="the latent store's directory (default: ./chaid-cache; the systemd "
                        "unit uses /var/lib/chaid)")
    p.add_argument("--torch-threads", type=int,
                   help="torch threads (default: 1 for a small model on a CPU, else every core)")
    p.add_argument("--model", help="model preset (default: tiny-shapes)")
    p.add_argument("--weights", type=Path, help="local weights directory or .safetensors file")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--log-format", choices=["text", "json"], help="log line format")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    from chaid.config import load_settings

    settings = load_settings(
        args.config,
        overrides={
            "model": {"name": args.model, "weights": args.weights, "device": args.device},
            "server": {"socket": args.socket, "log_format": args.log_format,
                       "torch_threads": args.torch_threads},
            "store": {"data_dir": args.data_dir},
        },
    )
    from chaid.server.logs import setup_logging

    level = "debug" if getattr(args, "verbose", False) else settings.server.log_level
    setup_logging(settings.server.log_format, level)
    from chaid.server.daemon import run

    return run(settings)
