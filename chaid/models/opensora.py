"""OpenSora 1.2 from one local weights directory: its layout, its sizes, and a verifier.

The directory holds the three released parts, each as Hugging Face publishes it::

    DIR/stdit/model.safetensors   hpcai-tech/OpenSora-STDiT-v3   (+ config.json)
    DIR/vae/model.safetensors     hpcai-tech/OpenSora-VAE-v1.2   (+ config.json)
    DIR/t5/                       DeepFloyd/t5-v1_1-xxl          (config.json, weights, spiece.model)

:func:`missing_files` lists what is absent, :func:`verify` checks every tensor name and
shape against the model from the safetensors headers alone (no tensor data is read), and
:func:`build_opensora_parts` loads the text encoder and the VAE.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from chaid.errors import WeightsError
from chaid.models.opensora_vae import OpenSoraVAE, OpenSoraVAEConfig, build_opensora_vae
from chaid.models.stdit3 import STDiT3, STDiT3Config
from chaid.models.t5 import TOKENIZER_FILES, WEIGHT_FILES, T5TextEncoder, read_t5_config
from chaid.models.weights import (
    DIT_SUBDIR,
    WEIGHTS_FILE,
    check_against,
    model_shapes,
    read_header,
)
from chaid.numerics import Numerics

# Sub-directories of a weights directory, one per part.
STDIT_DIR = DIT_SUBDIR
VAE_DIR = "vae"
T5_DIR = "t5"

# Resolutions OpenSora 1.2 was trained for at 16:9 (height, width), and its two clip lengths
# at 24 fps. Other sizes run (the VAE takes any size) but were not trained.
RESOLUTIONS: dict[str, tuple[int, int]] = {
    "240p": (240, 426),
    "360p": (360, 640),
    "480p": (480, 854),
}
DURATIONS: dict[str, int] = {"2s": 51, "4s": 102}

# STDiT3 config.json fields (upstream names) compared with the preset when present.
_STDIT_CONFIG_FIELDS = (
    "hidden_size",
    "depth",
    "num_heads",
    "in_channels",
    "caption_channels",
    "model_max_length",
    "input_sq_size",
)
# Bytes per element of each safetensors dtype: the expected file size follows from the header.
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1}


def dit_weights_path(weights: str | Path) -> Path:
    """The DiT checkpoint inside an OpenSora weights directory (DIR/stdit), or ``weights``
    itself when it is the checkpoint (a .safetensors file or a folder with one)."""
    path = Path(weights).expanduser()
    return path / STDIT_DIR if (path / STDIT_DIR).is_dir() else path


def _first_present(directory: Path, names: tuple[str, ...]) -> Path | None:
    return next((directory / n for n in names if (directory / n).is_file()), None)


def missing_files(root: str | Path) -> list[str]:
    """What a weights directory lacks, as readable items (empty: complete)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        return [f"{root} (not a directory)"]
    missing = []
    for part in (STDIT_DIR, VAE_DIR):
        if not (root / part / WEIGHTS_FILE).is_file():
            missing.append(f"{part}/{WEIGHTS_FILE}")
    t5 = root / T5_DIR
    if not (t5 / "config.json").is_file():
        missing.append(f"{T5_DIR}/config.json")
    if _first_present(t5, WEIGHT_FILES) is None:
        missing.append(f"{T5_DIR}/ weights (one of {', '.join(WEIGHT_FILES)})")
    if _first_present(t5, TOKENIZER_FILES) is None:
        missing.append(f"{T5_DIR}/ tokenizer (one of {', '.join(TOKENIZER_FILES)})")
    return missing


def require_complete(root: str | Path, model: str = "opensora-1.2") -> Path:
    """The directory, or WeightsError listing every missing item."""
    root = Path(root).expanduser()
    needs = f"{model} needs a weights directory with stdit/, vae/ and t5/ (see docs/opensora.md)"
    if not root.is_dir():
        raise WeightsError(f"{needs}; {root} is not a directory")
    missing = missing_files(root)
    if missing:
        raise WeightsError(f"{needs}; {root} is missing: " + "; ".join(missing))
    return root


def build_opensora_parts(
    root: str | Path,
    dit: STDiT3Config,
    vae: OpenSoraVAEConfig,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    text_dtype: torch.dtype = torch.float32,
    text_after_encode: str = "keep",
    model: str = "opensora-1.2",
    numerics: Numerics | str = Numerics.UPSTREAM,
) -> tuple[T5TextEncoder, OpenSoraVAE]:
    """The T5 encoder (on ``device`` in ``text_dtype``) and the VAE (strictly, on ``device``
    in ``dtype``, normalising with ``numerics``) of a complete weights directory, both
    loaded now: a daemon that reports ready has every part in memory.

    Raises WeightsError naming everything missing, or any tensor of the VAE that does not
    match, before the DiT is touched."""
    root = require_complete(root, model)
    text = T5TextEncoder(
        root / T5_DIR,
        max_length=dit.model_max_length,
        device=device,
        dtype=text_dtype,
        after_encode=text_after_encode,
    )
    vae_model = build_opensora_vae(vae, root / VAE_DIR, device=device, dtype=dtype,
                                   numerics=numerics)
    text.load()
    return text, vae_model


# --------------------------------------------------------------------------------------
# Verification


@dataclass
class PartReport:
    """What verify found for one part; ``problems`` empty means it matches."""

    part: str
    path: str
    tensors: int = 0
    elements: int = 0
    bytes: int = 0
    dtypes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "part": self.part,
            "ok": self.ok,
            "path": self.path,
            "tensors": self.tensors,
            "elements": self.elements,
            "bytes": self.bytes,
            "dtypes": self.dtypes,
            "problems": self.problems,
            "notes": self.notes,
        }


def _read_full_header(path: Path) -> tuple[dict[str, tuple[tuple[int, ...], str]], int]:
    """Tensor (shape, dtype) by name and the file size the header implies."""
    header = read_header(path)
    with path.open("rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        raw = json.loads(fh.read(size))
    data_end = max(
        (int(v["data_offsets"][1]) for k, v in raw.items() if k != "__metadata__"), default=0
    )
    return header, 8 + size + data_end


def _scan(report: PartReport, files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Read the headers of ``files`` into the report; shapes by name (all files)."""
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: set[str] = set()
    for file in files:
        try:
            header, expected_size = _read_full_header(file)
        except (WeightsError, OSError, ValueError, KeyError, TypeError) as exc:
            report.problems.append(f"{file.name}: unreadable safetensors header ({exc})")
            continue
        actual = file.stat().st_size
        if actual != expected_size:
            report.problems.append(
                f"{file.name}: {actual} bytes, the header describes {expected_size}"
                " (an interrupted download?)"
            )
        for name, (shape, dtype) in header.items():
            shapes[name] = shape
            dtypes.add(dtype)
            report.bytes += math.prod(shape) * _DTYPE_BYTES.get(dtype, 0)
    report.tensors = len(shapes)
    report.elements = sum(math.prod(s) for s in shapes.values())
    report.dtypes = sorted(dtypes)
    return shapes


def _compare(report: PartReport, expected, found, optional=None) -> None:
    try:
        check_against(expected, found, optional, source=report.part)
    except WeightsError as exc:
        report.problems.append(str(exc))


def _verify_stdit(root: Path, cfg: STDiT3Config) -> PartReport:
    file = root / STDIT_DIR / WEIGHTS_FILE
    report = PartReport(STDIT_DIR, str(file))
    if not file.is_file():
        report.problems.append("missing")
        return report
    found = _scan(report, [file])
    with torch.device("meta"):
        model = STDiT3(cfg)
    _compare(report, model_shapes(model), found, {"rope.freqs": (cfg.head_dim // 2,)})
    config_file = root / STDIT_DIR / "config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            report.problems.append(f"config.json unreadable: {exc}")
            return report
        for name in _STDIT_CONFIG_FIELDS:
            if name in config and config[name] != getattr(cfg, name):
                report.problems.append(
                    f"config.json {name} is {config[name]!r}, the model {getattr(cfg, name)!r}"
                )
    else:
        report.notes.append("no config.json (optional)")
    return report


def _verify_vae(root: Path, cfg: OpenSoraVAEConfig) -> PartReport:
    file = root / VAE_DIR / WEIGHTS_FILE
    report = PartReport(VAE_DIR, str(file))
    if not file.is_file():
        report.problems.append("missing")
        return report
    found = _scan(report, [file])
    _compare(report, model_shapes(build_opensora_vae(cfg, device="meta")), found)
    return report


def _t5_weight_files(t5: Path) -> tuple[list[Path], str | None]:
    """The safetensors files of a T5 snapshot, or ([], kind) for PyTorch pickles."""
    if (t5 / "model.safetensors.index.json").is_file():
        index = json.loads((t5 / "model.safetensors.index.json").read_text())
        return [t5 / f for f in sorted(set(index["weight_map"].values()))], None
    if (t5 / "model.safetensors").is_file():
        return [t5 / "model.safetensors"], None
    pickled = _first_present(t5, ("pytorch_model.bin.index.json", "pytorch_model.bin"))
    return [], pickled.name if pickled else None


def _verify_t5(root: Path, dit: STDiT3Config) -> PartReport:
    t5 = root / T5_DIR
    report = PartReport(T5_DIR, str(t5))
    try:
        config = read_t5_config(t5)
    except WeightsError as exc:
        report.problems.append(str(exc))
        return report
    if config["d_model"] != dit.caption_channels:
        report.problems.append(
            f"d_model is {config['d_model']}, the DiT expects {dit.caption_channels}"
        )
    tokenizer = _first_present(t5, TOKENIZER_FILES)
    if tokenizer is None:
        report.problems.append(f"no tokenizer ({' or '.join(TOKENIZER_FILES)})")
    try:
        files, pickled = _t5_weight_files(t5)
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        report.problems.append(f"unreadable safetensors index: {exc}")
        return report
    if pickled:
        report.notes.append(f"weights in {pickled} (PyTorch pickle): names not checked")
        return report
    if not files:
        report.problems.append(f"no weights ({', '.join(WEIGHT_FILES)})")
        return report
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        report.problems.append(f"shards missing: {', '.join(absent)}")
        return report
    found = _scan(report, files)
    from transformers import T5Config, T5EncoderModel

    with torch.device("meta"):
        encoder = T5EncoderModel(T5Config(**{**config, "use_cache": False}))
    # The encoder's embedding is tied to "shared"; checkpoints hold one of them.
    expected = {
        k: v for k, v in model_shapes(encoder).items() if k != "encoder.embed_tokens.weight"
    }
    encoder_found = {k: v for k, v in found.items() if not k.startswith("decoder.")}
    encoder_found.pop("encoder.embed_tokens.weight", None)
    if "lm_head.weight" in encoder_found:
        encoder_found.pop("lm_head.weight")
    _compare(report, expected, encoder_found)
    unused = len(found) - len(encoder_found)
    if unused:
        report.notes.append(f"{unused} tensors the encoder does not use (decoder, lm_head)")
    return report


def verify(root: str | Path, dit: STDiT3Config, vae: OpenSoraVAEConfig) -> dict[str, Any]:
    """Check a weights directory without loading it: layout, every tensor name and shape of
    the DiT, VAE and T5 checkpoints (safetensors headers), file sizes against the headers,
    and the configs. Returns {"root", "ok", "missing", "parts": [PartReport.as_dict()]}."""
    root = Path(root).expanduser()
    missing = missing_files(root)
    parts = []
    if root.is_dir():
        parts = [_verify_stdit(root, dit), _verify_vae(root, vae), _verify_t5(root, dit)]
    return {
        "root": str(root),
        "ok": not missing and all(p.ok for p in parts),
        "missing": missing,
        "parts": [p.as_dict() for p in parts],
    }


def format_report(report: dict[str, Any]) -> str:
    """verify()'s report as lines for a terminal: one per part, problems indented."""
    lines = [f"{report['root']}: {'ok' if report['ok'] else 'NOT OK'}"]
    lines += [f"  missing: {item}" for item in report["missing"]]
    for part in report["parts"]:
        facts = (
            f"{part['tensors']} tensors, {part['elements'] / 1e6:,.1f} M elements,"
            f" {'/'.join(part['dtypes']) or '-'}, {part['bytes'] / 1e6:,.1f} MB"
        )
        lines.append(f"  {part['part']:<6} {'ok' if part['ok'] else 'NOT OK':<7} {facts}")
        lines += [f"         problem: {p}" for p in part["problems"]]
        lines += [f"         note: {n}" for n in part["notes"]]
    return "\n".join(lines)
