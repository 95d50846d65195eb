"""The ``chai`` command: talk to a running chaid daemon."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from chai_client import __version__
from chai_client.errors import ChaiError, DaemonUnavailable, RpcError
from chai_client.protocol import MODEL_CFG_SCALE
from chai_client.sync import Client

# Exit statuses: 1 the daemon refused or failed the request, 2 usage, 3 no daemon/connection.
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3


DEFAULT_SOCKET_HELP = "daemon socket (default: $CHAI_SOCKET or /run/chaid/chaid.sock)"


def _connection_options(suppress: bool) -> argparse.ArgumentParser:
    """--socket and --timeout, accepted before the command and after it. After it they
    default to SUPPRESS, so an option given before the command is not reset."""
    p = argparse.ArgumentParser(add_help=False)
    default = argparse.SUPPRESS if suppress else None
    p.add_argument("--socket", type=Path, default=default, help=DEFAULT_SOCKET_HELP)
    p.add_argument("--timeout", type=float, default=default,
                   help="seconds to wait on the socket (default: none)")
    return p


def _sizes(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frames", type=int, help="video frames (default: the model's)")
    p.add_argument("--height", type=int, help="height in pixels (default: the model's)")
    p.add_argument("--width", type=int, help="width in pixels (default: the model's)")


def _json(p: argparse.ArgumentParser, what: str = "print one JSON object") -> None:
    p.add_argument("--json", action="store_true", help=what)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chai", description="Client of the chaid video daemon.",
                                parents=[_connection_options(suppress=False)])
    p.add_argument("--version", action="version", version=f"chai {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = [_connection_options(suppress=True)]

    def command(parent, name: str, help: str) -> argparse.ArgumentParser:  # noqa: A002
        return parent.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                                 parents=common)

    g = command(sub, "generate", "generate a video and write it as MP4")
    g.add_argument("prompt", help="the text prompt")
    g.add_argument("-o", "--output", type=Path, required=True,
                   help="MP4 file to write; - writes it to standard output")
    _sizes(g)
    g.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    g.add_argument("--cfg-scale", type=float,
                   help="classifier-free guidance scale (default: the model's)")
    g.add_argument("--cache", choices=["auto", "off", "refresh"], default="auto",
                   help="auto: reuse a matching entry (default); refresh: force a miss; "
                   "off: no cache, --steps plain steps")
    g.add_argument("--steps", type=int, help="steps of an uncached run (--cache off)")
    g.add_argument("--deadline", type=float, help="give up after this many seconds")
    g.add_argument("--priority", type=int, default=0,
                   help="0-9: order among this client's own queued requests (default: 0)")
    _json(g, "print one JSON object (to standard error with -o -)")
    g.set_defaults(func=_generate)

    s = command(sub, "stats", "daemon and cache statistics")
    _json(s)
    s.set_defaults(func=_stats)

    s = command(sub, "ping", "check the daemon answers")
    s.set_defaults(func=_ping)

    s = command(sub, "lookup", "would this prompt hit the cache, and why")
    s.add_argument("prompt", help="the text prompt")
    _sizes(s)
    _json(s)
    s.set_defaults(func=_lookup)

    c = command(sub, "cache", "list, warm or remove cache entries")
    csub = c.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    s = command(csub, "ls", "entries, most recently used first")
    s.add_argument("--limit", type=int, default=50,
                   help="at most this many entries; 0 for all (default: 50)")
    _json(s)
    s.set_defaults(func=_cache_ls)
    s = command(csub, "warm", "run a full generation only to cache it (admin)")
    s.add_argument("prompt", help="the text prompt")
    _sizes(s)
    s.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    _json(s)
    s.set_defaults(func=_cache_warm)
    s = command(csub, "evict", "remove entries by id (admin)")
    s.add_argument("entry_ids", type=int, nargs="+", help="ids, as `chai cache ls` shows them")
    s.set_defaults(func=_cache_evict)
    s = command(csub, "clear", "remove every entry (admin)")
    s.add_argument("-y", "--yes", action="store_true",
                   help="do not ask for confirmation (needed when standard input is not a "
                        "terminal)")
    s.set_defaults(func=_cache_clear)
    return p


class _Progress:
    WIDTH = 30

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.drawn = False

    def __call__(self, step: int, steps: int) -> None:
        done = step - 1
        filled = int(self.WIDTH * done / max(steps, 1))
        sys.stderr.write(f"\rdenoising [{'#' * filled}{'-' * (self.WIDTH - filled)}] "
                         f"{done}/{steps} {time.perf_counter() - self.start:6.1f}s")
        sys.stderr.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            sys.stderr.write("\r" + " " * (self.WIDTH + 40) + "\r")
            sys.stderr.flush()


def _write_atomic(path: Path, data: bytes) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; a video is an ordinary file
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class OutputError(Exception):
    """The output path cannot take the video (checked before any work is asked for)."""


def check_output(path: Path) -> None:
    """Refuse an output the video could not be written to, before generating it."""
    if str(path) == "-":
        if sys.stdout.isatty():
            raise OutputError("-o - writes the MP4 to standard output, which is a terminal; "
                              "redirect it (chai generate ... -o - > video.mp4)")
        return
    if path.is_dir():
        raise OutputError(f"{path} is a directory; give a file name, e.g. {path / 'video.mp4'}")
    existing = path.parent  # Path("v.mp4").parent is "."
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot write {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path}: no write permission in {existing}")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"cannot write {path}: the file is not writable")


def _generate(client: Client, args: argparse.Namespace) -> int:
    to_stdout = str(args.output) == "-"
    bar = _Progress() if sys.stderr.isatty() and not args.json else None
    scale = MODEL_CFG_SCALE if args.cfg_scale is None else args.cfg_scale
    try:
        result = client.generate(
            args.prompt, frames=args.frames, height=args.height, width=args.width,
            seed=args.seed, cfg_scale=scale, cache=args.cache, steps=args.steps,
            deadline_s=args.deadline, on_progress=bar, priority=args.priority)
    finally:
        if bar:
            bar.close()
    report = sys.stderr if to_stdout else sys.stdout
    if to_stdout:
        sys.stdout.buffer.write(result.video)
        sys.stdout.buffer.flush()
    else:
        _write_atomic(args.output, result.video)
    if args.json:
        print(json.dumps({"output": str(args.output), "prompt": args.prompt,
                          **result.summary()}), file=report)
    else:
        how = result.cache
        if result.matched:
            pairs = ", ".join(f"{e.query}~{e.cached} {e.cosine:.2f}"
                              for e in result.matched.entities)
            how += f" (entry {result.matched.entry_id}: {pairs})"
        _report_understanding(result.understood, sys.stderr)
        if result.not_cached:
            print(f"not cached: {result.not_cached}", file=report)
        where = "standard output" if to_stdout else args.output
        print(f"wrote {where}: {result.frames} frames {result.width}x{result.height}, "
              f"{how}, {result.steps} steps, {result.timings['total_ms'] / 1000:.2f} s",
              file=report)
    return 0


def _report_understanding(understood: dict | None, out) -> None:
    """What the model could not use of the prompt, in a line or two (nothing when it knew
    every word, or has no vocabulary to report against)."""
    if not understood:
        return
    if not understood.get("drawable", True):
        print("warning: the model cannot draw anything this prompt names; it knows shapes, "
              "colours, motions and backgrounds of its world (see `chai lookup`)", file=out)
    if understood.get("unknown"):
        print(f"the model does not know: {', '.join(understood['unknown'])}", file=out)


def _stats(client: Client, args: argparse.Namespace) -> int:
    stats = client.stats()
    if args.json:
        print(json.dumps(stats, indent=2, default=str))
        return 0
    cache = stats.get("cache", {})
    gens = stats.get("generations", {})
    print(f"chaid {stats['version']} pid {stats['pid']}, up {stats['uptime_s']} s, "
          f"model {stats['model']} on {stats['device']}")
    print(f"queue: {stats['queue']['queued']}/{stats['queue']['size']} waiting, "
          f"running: {'yes' if stats['queue']['running'] else 'no'}; "
          f"{stats['connections']} connections")
    print("generations: " + ", ".join(f"{k} {v}" for k, v in gens.items()))
    print(f"cache: {cache.get('entries')} entries, {cache.get('total_bytes')} of "
          f"{cache.get('budget_bytes')} bytes, policy {cache.get('policy')}")
    return 0


def _ping(client: Client, args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    reply = client.ping()
    print(f"pong from chaid {reply.get('version')} in {(time.perf_counter() - t0) * 1e3:.2f} ms")
    return 0


def _lookup(client: Client, args: argparse.Namespace) -> int:
    result = client.lookup(args.prompt, frames=args.frames, height=args.height,
                           width=args.width)
    if args.json:
        print(json.dumps(result.raw))
        return 0
    understood = result.understood
    if understood is not None:
        print(f"understood: {'; '.join(understood['known']) or '(nothing)'}")
        _report_understanding(understood, sys.stdout)
    print(f"entities: {', '.join(result.entities) or '(none)'}")
    if not result.hit:
        print(f"miss (no cached entity at or above {result.threshold})")
        return 0
    print(f"hit: entry {result.entry_id} ({result.cached_prompt!r}), score {result.score:.3f}")
    for m in result.matches:
        print(f"  {m.query!r} ~ {m.cached!r}: {m.cosine:.3f}")
    return 0


def _cache_ls(client: Client, args: argparse.Namespace) -> int:
    entries = client.cache_list(args.limit)
    if args.json:
        print(json.dumps(entries))
        return 0
    print(f"{'id':>6} {'hits':>5} {'bytes':>9}  prompt  [entities]")
    for e in entries:
        print(f"{e['id']:>6} {e['hits']:>5} {e['bytes']:>9}  {e['prompt'][:60]}  "
              f"[{', '.join(e['entities'])}]")
    return 0


def _cache_evict(client: Client, args: argparse.Namespace) -> int:
    out = client.cache_evict(args.entry_ids)
    print(f"evicted {out['evicted']}" + (f"; not found: {out['missing']}" if out["missing"]
                                         else ""))
    return 0


def _cache_warm(client: Client, args: argparse.Namespace) -> int:
    sizes = {k: v for k, v in (("frames", args.frames), ("height", args.height),
                               ("width", args.width)) if v is not None}
    out = client.cache_warm(args.prompt, seed=args.seed, **sizes)
    if args.json:
        print(json.dumps(out))
    elif out.get("entry_id") is None:
        print(f"ran {out['steps']} steps, but the cache did not keep the entry")
    else:
        print(f"cached entry {out['entry_id']} ({out['steps']} steps, "
              f"{out['timings']['total_ms'] / 1000:.2f} s)")
    return 0


def _cache_clear(client: Client, args: argparse.Namespace) -> int:
    if not args.yes:
        if not sys.stdin.isatty():
            print("chai: error: cache clear removes every entry; pass --yes to confirm",
                  file=sys.stderr)
            return EXIT_USAGE
        entries = client.stats().get("cache", {}).get("entries", "?")
        answer = input(f"remove all {entries} cache entries of the daemon? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing removed")
            return EXIT_ERROR
    print(f"evicted {client.cache_clear()} entries")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            check_output(args.output)
        with Client(args.socket, timeout=args.timeout) as client:
            return args.func(client, args)
    except OutputError as exc:
        print(f"chai: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except DaemonUnavailable as exc:
        print(f"chai: error: {exc}\n  is the daemon running? start one with `chaid serve "
              f"--socket PATH` (or `systemctl start chaid`), and point chai at it with "
              f"--socket PATH or CHAI_SOCKET=PATH", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except RpcError as exc:
        print(f"chai: error: {exc.message} [{exc.code}]", file=sys.stderr)
        return EXIT_ERROR
    except ChaiError as exc:
        print(f"chai: error: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        print("chai: interrupted (the daemon cancels the request)", file=sys.stderr)
        return 130



if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
