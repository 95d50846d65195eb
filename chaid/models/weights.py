"""Strict safetensors checkpoints: every tensor the model has, no other, every shape right.

A checkpoint is either a ``.safetensors`` file or a directory holding ``model.safetensors``
(the Hugging Face layout of OpenSora's releases). Loading compares the file's header with
the model's state dict before reading any tensor data, so a mismatched 5 GB checkpoint fails
in milliseconds with a message naming every offending tensor.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from chaid.errors import WeightsError

# File name inside a weights directory (Hugging Face convention).
WEIGHTS_FILE = "model.safetensors"
# The DiT's folder in a multi-part weights directory (OpenSora's stdit/, vae/, t5/; see
# chaid/models/opensora.py): model fingerprints and loaders find the DiT there.
DIT_SUBDIR = "stdit"
# How many offending names an error message lists before it says "and N more".
MAX_NAMES_IN_ERROR = 12


def resolve_weights_file(path: str | Path) -> Path:
    """A directory → its model.safetensors, or the DiT's (stdit/model.safetensors) in a
    multi-part weights directory; a file → itself. Raises WeightsError if absent."""
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / WEIGHTS_FILE).is_file() and (p / DIT_SUBDIR / WEIGHTS_FILE).is_file():
            p = p / DIT_SUBDIR
        p = p / WEIGHTS_FILE
    if not p.is_file():
        raise WeightsError(f"no weights file at {p}")
    return p


# Bytes read per call while hashing a weights file (large sequential reads are fastest).
_DIGEST_CHUNK = 8 << 20


def hash_weights_file(digest: Any, path: str | Path) -> Any:
    """Feed a weights file's whole content (:func:`resolve_weights_file`) to ``digest`` (a
    hashlib object), in large reads; returns ``digest``."""
    with open(resolve_weights_file(path), "rb") as fh:
        while chunk := fh.read(_DIGEST_CHUNK):
            digest.update(chunk)
    return digest


def file_digest(path: str | Path, size: int = 12) -> str:
    """A hex digest of a weights file's whole content (``size`` bytes of BLAKE2b): what
    tells two trainings of the same network apart."""
    return hash_weights_file(hashlib.blake2b(digest_size=size), path).hexdigest()


def read_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor names → (shape, dtype string) from a safetensors header, without reading data."""
    try:
        with path.open("rb") as fh:
            size_bytes = fh.read(8)
            if len(size_bytes) != 8:
                raise WeightsError(f"{path} is not a safetensors file (too short)")
            size = int.from_bytes(size_bytes, "little")
            if size <= 0 or size > path.stat().st_size - 8:
                raise WeightsError(f"{path} is not a safetensors file (bad header length)")
            header = json.loads(fh.read(size))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"cannot read safetensors header of {path}: {exc}") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path} has a malformed safetensors header")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            out[name] = (tuple(int(d) for d in info["shape"]), str(info["dtype"]))
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{path}: malformed header entry for tensor {name!r}") from None
    return out


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_NAMES_IN_ERROR])
    more = len(names) - MAX_NAMES_IN_ERROR
    return shown + (f" and {more} more" if more > 0 else "")


def check_against(
    expected: dict[str, tuple[int, ...]],
    found: dict[str, tuple[int, ...]],
    optional: dict[str, tuple[int, ...]] | None = None,
    source: str = "checkpoint",
) -> None:
    """Raise WeightsError naming every missing, unexpected or wrongly shaped tensor."""
    optional = optional or {}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected) - set(optional))
    wrong = sorted(
        f"{n} (expected {list(expected.get(n, optional.get(n)))}, found {list(found[n])})"
        for n in found
        if n in expected or n in optional
        if tuple(found[n]) != tuple(expected.get(n, optional.get(n)))
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_listing(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} with the wrong shape: {_listing(wrong)}")
    if problems:
        raise WeightsError(f"{source} does not match the model: " + "; ".join(problems))


def model_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every persistent tensor of the model (parameters and buffers) → its shape."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def load_weights(
    model: nn.Module,
    path: str | Path,
    *,
    optional: dict[str, torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> Path:
    """Load a checkpoint into ``model`` strictly; returns the file it read.

    Args:
        model: the target module; may live on the meta device (its tensors are then replaced
            by the loaded ones, so memory is allocated once, on ``device``).
        path: a .safetensors file or a directory with model.safetensors.
        optional: tensors a checkpoint may carry that the model recomputes (name → the value
            the model uses). When present in the file they must match it closely.
        device, dtype: where the loaded floating-point tensors go and in which dtype
            (None keeps the file's dtype).

    Raises:
        WeightsError: unreadable file; missing, unexpected or wrongly shaped tensors (all
            named); an optional tensor whose values disagree with the model's.
    """
    file = resolve_weights_file(path)
    header = read_header(file)
    optional = optional or {}
    check_against(
        model_shapes(model),
        {k: v[0] for k, v in header.items()},
        {k: tuple(v.shape) for k, v in optional.items()},
        source=str(file),
    )
    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(file), framework="pt", device=str(device)) as fh:
            for name in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensor = fh.get_tensor(name)
                if name in optional:
                    ref = optional[name].to(tensor.device, torch.float32)
                    if not torch.allclose(tensor.float(), ref, rtol=1e-4, atol=1e-6):
                        raise WeightsError(
                            f"{file}: {name} differs from the values the model computes"
                        )
                    continue
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                state[name] = tensor
    except WeightsError:
        raise
    except Exception as exc:  # safetensors raises its own error types for truncated files
        raise WeightsError(f"cannot read tensors from {file}: {exc}") from None
    model.load_state_dict(state, strict=True, assign=True)
    return file


def save_weights(
    model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """Write the model's state dict as safetensors (a directory gets model.safetensors)."""
    p = Path(path)
    if p.suffix != ".safetensors":
        p.mkdir(parents=True, exist_ok=True)
        p = p / WEIGHTS_FILE
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(p), metadata=metadata)
    return p


def count_elements(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes.values())
