"""Settings: a TOML file, then the environment (``CHAID_<SECTION>_<FIELD>``), then flags.

Each section is a frozen dataclass; every field says in its comment what it trades off.
Later sources override earlier ones field by field. Unknown sections or keys in the file,
values of the wrong type and out-of-range values are a :class:`ConfigError` that names the
offending key and where it came from, never a silent default.
"""

from __future__ import annotations

import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chaid.errors import ConfigError

ENV_PREFIX = "CHAID_"


@dataclass(frozen=True)
class ModelSettings:
    # Registry key of the model preset; "tiny-shapes" runs anywhere, "opensora-1.2" wants a GPU.
    name: str = "tiny-shapes"
    # Local weights (a directory or a .safetensors file). None: the preset's shipped weights,
    # or a seeded random initialisation when the preset ships none.
    weights: Path | None = None
    # "auto" takes CUDA when torch sees a device, else the CPU.
    device: str = "auto"
    # float32 is exact and the only sensible choice on a CPU; bfloat16 halves GPU memory.
    dtype: str = "float32"


@dataclass(frozen=True)
class SamplerSettings:
    # Denoising steps of a full run: more steps, better video, linearly more time.
    steps: int = 30
    # Classifier-free guidance scale: higher follows the prompt harder at the cost of variety.
    cfg_scale: float = 7.0


@dataclass(frozen=True)
class ChaiSettings:
    # Steps of a cache miss (full mode); its latents at cache_steps are what a hit reuses.
    full_steps: int = 30
    # Steps of a cache hit (fast mode): fewer is faster and, past a point, visibly worse.
    fast_steps: int = 8
    # 1-based denoising steps whose first block attends to the cached latent of the same step.
    cache_steps: tuple[int, ...] = (2, 3, 4)
    # Spatial blocks that run Cache Attention; more blocks pull harder toward the cached video.
    cache_blocks: tuple[int, ...] = (0,)
    # "both": both guidance branches attend to the cache; "cond": only the prompt branch.
    branches: str = "both"
    # "cache": keys/values from the cached latent only; "cache+current": both token sets.
    kv_source: str = "cache"
    # "auto" uses the CuPy kernel on a GPU when available; "reference" or "cupy" force one.
    kernel: str = "auto"


@dataclass(frozen=True)
class Settings:
    model: ModelSettings = field(default_factory=ModelSettings)
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    chai: ChaiSettings = field(default_factory=ChaiSettings)

    def validate(self) -> Settings:
        """Return self if every value is in range, else raise ConfigError."""
        if self.model.device not in ("auto", "cpu", "cuda") and not self.model.device.startswith(
            "cuda:"
        ):
            raise ConfigError(
                f"model.device must be auto, cpu, cuda or cuda:N, not {self.model.device!r}"
            )
        if self.model.dtype not in DTYPE_NAMES:
            raise ConfigError(
                f"model.dtype must be one of {sorted(DTYPE_NAMES)}, not {self.model.dtype!r}"
            )
        if not 1 <= self.sampler.steps <= MAX_STEPS:
            raise ConfigError(f"sampler.steps must be in 1..{MAX_STEPS}, not {self.sampler.steps}")
        if not 0.0 <= self.sampler.cfg_scale <= MAX_CFG_SCALE:
            raise ConfigError(
                f"sampler.cfg_scale must be in 0..{MAX_CFG_SCALE}, not {self.sampler.cfg_scale}"
            )
        chai = self.chai
        for name in ("full_steps", "fast_steps"):
            if not 1 <= getattr(chai, name) <= MAX_STEPS:
                raise ConfigError(
                    f"chai.{name} must be in 1..{MAX_STEPS}, not {getattr(chai, name)}"
                )
        if any(not 1 <= k <= chai.fast_steps for k in chai.cache_steps):
            raise ConfigError(
                f"chai.cache_steps must lie in 1..fast_steps, not {list(chai.cache_steps)}"
            )
        if any(k > chai.full_steps for k in chai.cache_steps):
            raise ConfigError("chai.cache_steps must not exceed chai.full_steps")
        if any(b < 0 for b in chai.cache_blocks) or not chai.cache_blocks:
            raise ConfigError(
                f"chai.cache_blocks must be block indices >= 0, not {list(chai.cache_blocks)}"
            )
        for name, allowed in (
            ("branches", ("both", "cond")),
            ("kv_source", ("cache", "cache+current")),
            ("kernel", ("auto", "reference", "cupy")),
        ):
            if getattr(chai, name) not in allowed:
                raise ConfigError(
                    f"chai.{name} must be one of {', '.join(allowed)}, not {getattr(chai, name)!r}"
                )
        return self


# dtype names accepted in settings; the engine maps them to torch dtypes.
DTYPE_NAMES = {"float32", "float16", "bfloat16"}
# More steps than this buys nothing for a rectified-flow sampler and only ties up the device.
MAX_STEPS = 1000
# Guidance far beyond the usual 1..15 saturates every pixel; refuse it as a likely typo.
MAX_CFG_SCALE = 100.0


def load_settings(
    config_file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Settings:
    """Build validated Settings from a TOML file, the environment and explicit overrides.

    Args:
        config_file: a TOML file with ``[model]`` / ``[sampler]`` tables, or None.
        env: the environment to read ``CHAID_<SECTION>_<FIELD>`` from (default os.environ).
        overrides: ``{section: {field: value}}`` from command-line flags; None values are
            skipped so an unset flag never hides a file or environment value.

    Raises:
        ConfigError: unreadable file, unknown key, wrong type or out-of-range value.
    """
    layers: dict[str, dict[str, Any]] = {}
    if config_file is not None:
        path = Path(config_file)
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        _merge(layers, data, source=str(path))
    _merge(layers, _from_env(os.environ if env is None else env), source="environment")
    if overrides:
        cleaned = {s: {k: v for k, v in f.items() if v is not None} for s, f in overrides.items()}
        _merge(layers, cleaned, source="command line")

    sections = {name: cls(**layers.get(name, {})) for name, cls in _SECTION_TYPES.items()}
    return Settings(**sections).validate()


_SECTION_TYPES: dict[str, type] = {
    "model": ModelSettings,
    "sampler": SamplerSettings,
    "chai": ChaiSettings,
}


def _from_env(env: Mapping[str, str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX):
            continue
        rest = key[len(ENV_PREFIX) :].lower()
        for section in _SECTION_TYPES:
            if rest.startswith(section + "_"):
                out.setdefault(section, {})[rest[len(section) + 1 :]] = value
                break
    return out


def _merge(layers: dict[str, dict[str, Any]], data: Mapping[str, Any], source: str) -> None:
    for section, values in data.items():
        if section not in _SECTION_TYPES:
            raise ConfigError(f"unknown settings section [{section}] in {source}")
        if not isinstance(values, Mapping):
            raise ConfigError(f"[{section}] in {source} must be a table")
        hints = typing.get_type_hints(_SECTION_TYPES[section])
        for name, raw in values.items():
            if name not in hints:
                known = ", ".join(sorted(hints))
                raise ConfigError(f"unknown setting {section}.{name} in {source} (known: {known})")
            layers.setdefault(section, {})[name] = _coerce(
                raw, hints[name], f"{section}.{name}", source
            )


def _coerce(value: Any, hint: Any, name: str, source: str) -> Any:
    """Convert a TOML or environment value to the field's declared type."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ConfigError(f"{name} from {source} must be a list, not {value!r}")
        return tuple(
            _coerce(item.strip() if isinstance(item, str) else item, args[0], name, source)
            for item in items
            if not (isinstance(item, str) and not item.strip())
        )
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name, source)
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in (
                "1",
                "true",
                "yes",
                "on",
                "0",
                "false",
                "no",
                "off",
            ):
                return value.lower() in ("1", "true", "yes", "on")
            raise ValueError(value)
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if hint is Path:
            if not isinstance(value, str | Path):
                raise ValueError(value)
            return Path(value).expanduser()
        if hint is str:
            if not isinstance(value, str):
                raise ValueError(value)
            return value
    except ValueError:
        raise ConfigError(
            f"{name} from {source} must be {getattr(hint, '__name__', hint)}, not {value!r}"
        ) from None
    raise ConfigError(f"{name}: unsupported setting type {hint}")
