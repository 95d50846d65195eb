"""The LMDB data file as bytes: its meta pages, read before LMDB maps the file.

LMDB maps ``data.mdb`` and trusts it: a file shorter than its newest commit says (a
truncated copy, a full disk during a restore) turns the first touch of a missing page into
a SIGBUS that kills the process without a word. Reading the two meta pages with plain file
reads first lets a store refuse such a file with a message instead.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from chaid.store.errors import StoreCorruptError

# LMDB's on-disk meta page (lmdb 0.9, 64-bit): a 16-byte page header, then the magic, the
# format version, the map address and size, two 48-byte database records (the first one's
# pad holds the page size), the last used page number and the transaction id.
_META_MAGIC = 0xBEEFC0DE
_META_VERSION = 1
_META_FLAG = 0x08
_PAGE_FLAGS = struct.Struct("<H")
_MAGIC_VERSION = struct.Struct("<II")
_PAGE_SIZE = struct.Struct("<I")
_LAST_PAGE_TXNID = struct.Struct("<QQ")
_FLAGS_AT, _MAGIC_AT, _PSIZE_AT, _LAST_AT = 10, 16, 40, 136
_MIN_PAGE, _MAX_PAGE = 512, 65536

def repair_hint(data_dir: Path) -> str:
    return (f"stop the daemon and run `chaid cache check --repair --data-dir {data_dir}` to "
            "copy every intact entry into a new store (the damaged file is kept beside "
            "it), or move the directory aside to start empty")


@dataclass(frozen=True)
class FileState:
    """What the meta pages of ``data.mdb`` say about the file."""

    size: int
    page_size: int
    last_page: int
    txnid: int

    @property
    def needed(self) -> int:
        """Bytes the newest commit's pages occupy: the file must be at least this long."""
        return (self.last_page + 1) * self.page_size

    @property
    def truncated(self) -> bool:
        return self.size < self.needed


def _meta(page: bytes, which: int) -> tuple[int, int, int]:
    """(page size, last page, txnid) of one meta page; StoreCorruptError if it is not one."""
    if len(page) < _LAST_AT + _LAST_PAGE_TXNID.size:
        raise StoreCorruptError(f"data.mdb is too short to hold meta page {which}")
    (flags,) = _PAGE_FLAGS.unpack_from(page, _FLAGS_AT)
    magic, version = _MAGIC_VERSION.unpack_from(page, _MAGIC_AT)
    if not flags & _META_FLAG or magic != _META_MAGIC:
        raise StoreCorruptError(f"meta page {which} of data.mdb is damaged (not an LMDB file?)")
    if version != _META_VERSION:
        raise StoreCorruptError(f"data.mdb has LMDB format {version}, not {_META_VERSION}")
    (page_size,) = _PAGE_SIZE.unpack_from(page, _PSIZE_AT)
    last_page, txnid = _LAST_PAGE_TXNID.unpack_from(page, _LAST_AT)
    if not _MIN_PAGE <= page_size <= _MAX_PAGE or page_size & (page_size - 1):
        raise StoreCorruptError(f"meta page {which} of data.mdb names a page size of "
                                f"{page_size} bytes")
    return page_size, last_page, txnid


def inspect_data_file(path: Path) -> FileState | None:
    """The state of ``path`` (a ``data.mdb``) from its meta pages; None for an empty file
    (LMDB initialises it). StoreCorruptError if a meta page is damaged; the caller decides
    what a truncated file means."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return None
    with open(path, "rb") as f:
        page_size, metas = _both_metas(f)
    _, last_page, txnid = max(metas, key=lambda m: m[2])  # meta 0 on a tie, as LMDB
    return FileState(size, page_size, last_page, txnid)


def _both_metas(f) -> tuple[int, list[tuple[bytes, int, int]]]:
    """The page size and both meta pages of an open ``data.mdb`` as (page bytes, last
    page, txnid); StoreCorruptError if either is damaged or they disagree."""
    first = f.read(_MAX_PAGE)
    page_size, last0, txn0 = _meta(first, 0)
    f.seek(page_size)
    second = f.read(page_size)
    page_size1, last1, txn1 = _meta(second, 1)
    if page_size1 != page_size:
        raise StoreCorruptError("the two meta pages of data.mdb disagree on the page size")
    return page_size, [(first, last0, txn0), (second, last1, txn1)]


# The meta record (magic to txnid) inside a meta page: what makes a snapshot the newest.
_META_RECORD = slice(_MAGIC_AT, _LAST_AT + _LAST_PAGE_TXNID.size)


def older_snapshot(path: Path) -> FileState:
    """Make ``path`` (a scratch copy of a ``data.mdb``) open at its previous commit: the
    newer meta page gets the older one's record, so LMDB, which maps the snapshot of the
    higher transaction id, finds the older one in both. LMDB does not reuse the pages of
    the previous commit before the next one, so its trees are whole unless the file lost
    them. The older snapshot's state; StoreCorruptError if a meta page is damaged."""
    path = Path(path)
    with open(path, "r+b") as f:
        page_size, metas = _both_metas(f)
        newer = max((0, 1), key=lambda i: metas[i][2])  # meta 0 on a tie, as LMDB
        older_page, last_page, txnid = metas[1 - newer]
        f.seek(newer * page_size + _META_RECORD.start)
        f.write(older_page[_META_RECORD])
    return FileState(path.stat().st_size, page_size, last_page, txnid)


def check_data_file(data_dir: Path, path: Path) -> FileState | None:
    """Refuse, with what is wrong and how to recover, the store's ``data.mdb`` at ``path``
    when LMDB must not map it: damaged meta pages, or a file shorter than its newest
    commit."""
    if not path.exists():
        return None
    try:
        state = inspect_data_file(path)
    except StoreCorruptError as exc:
        raise StoreCorruptError(f"the store at {data_dir} is damaged: {exc}; "
                                f"{repair_hint(data_dir)}") from None
    if state is not None and state.truncated:
        raise StoreCorruptError(
            f"the store at {data_dir} is damaged: data.mdb is truncated ({state.size} bytes; "
            f"its last commit needs {state.needed}); {repair_hint(data_dir)}")
    return state
