"""Walk every key of an LMDB environment's named databases in a child process.

A damaged page can do worse than fail a read: LMDB asserts on some page types it meets
while stepping a cursor from leaf to leaf and aborts the process, and a page number past
the end of a short file is a SIGBUS. So the walk that checks a store's trees runs in a
process of its own (``python -m chaid.store.pagewalk DIR NAME...``, importing nothing but
lmdb), and whatever kills it is reported, not suffered.

The child prints one JSON line per database before walking it (so the parent knows where a
crash happened) and one with its problems at the end.
"""

from __future__ import annotations

import json
import subprocess
import sys

# A walk touches every branch and leaf page once: seconds for a very large store.
WALK_TIMEOUT_S = 600.0


def walk_in_child(lmdb_dir: str, names: list[str], max_dbs: int) -> list[str]:
    """The problems found walking ``names`` in ``lmdb_dir`` (empty: every key reachable and
    counted as recorded), one line each."""
    cmd = [sys.executable, "-m", "chaid.store.pagewalk", lmdb_dir, str(max_dbs), *names]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=WALK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return [f"a walk of the store's pages did not finish in {WALK_TIMEOUT_S:.0f} s"]
    walking = None
    problems: list[str] = []
    for line in done.stdout.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        walking = msg.get("walking", walking)
        problems = msg.get("problems", problems)
    if done.returncode == 0:
        return problems
    why = (done.stderr.strip().splitlines() or ["no message"])[-1][:300]
    where = f"the {walking} database" if walking else "the store"
    return [*problems, f"{where} is damaged (reading it killed a reader process with "
                       f"{_status(done.returncode)}: {why})"]


def _status(code: int) -> str:
    if code < 0:
        import signal

        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


def _main(argv: list[str]) -> int:
    import lmdb

    path, max_dbs, names = argv[0], int(argv[1]), argv[2:]
    env = lmdb.open(path, readonly=True, lock=False, max_dbs=max_dbs, subdir=True)
    problems = []
    for name in names:
        print(json.dumps({"walking": name}), flush=True)
        try:
            handle = env.open_db(name.encode(), create=False)
            # A transaction per database: LMDB fails every later read of a transaction
            # that met a damaged page.
            with env.begin() as txn:
                expected = txn.stat(handle)["entries"]
                seen = sum(1 for _ in txn.cursor(db=handle).iternext(values=False))
        except lmdb.Error as exc:
            problems.append(f"the {name} database is damaged ({exc})")
            continue
        if seen != expected:
            problems.append(f"the {name} database is damaged ({seen} keys reachable, "
                            f"{expected} recorded)")
    print(json.dumps({"problems": problems}), flush=True)
    env.close()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
