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

from chaid.checks import check_choice, check_int, check_number
from chaid.errors import ConfigError
from chaid.limits import (
    DEFAULT_LIMITS,
    MAX_CFG_SCALE,
    MAX_FRAMES,
    MAX_PROMPT_CHARS,
    MAX_SIDE,
    MAX_STEPS,
    RequestLimits,
)
from chaid.numerics import NUMERICS_CHOICES
from chaid.store.errors import StoreError
from chaid.store.settings import StoreSettings

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
    # dtype of a large text encoder (OpenSora's T5-XXL: 19 GB in float32, half in bfloat16).
    text_dtype: str = "float32"
    # What happens to that text encoder after each prompt is encoded: "keep" it on the
    # device, "offload" it to the CPU until the next prompt, or "free" it (reloaded on use).
    text_after_encode: str = "keep"
    # How the model's arithmetic rounds: "upstream" as OpenSora 1.2's own bf16 inference
    # (its weights were trained through those roundings), "exact" in float32, "auto" the
    # preset's (upstream for OpenSora presets, exact for those trained here).
    numerics: str = "auto"


@dataclass(frozen=True)
class SamplerSettings:
    # Denoising steps of a full run: more steps, better video, linearly more time.
    steps: int = 30
    # Classifier-free guidance scale: higher follows the prompt harder at the cost of variety.
    # Unset: the model's own (7.0 for OpenSora 1.2, tuned per preset; `chaid models list`).
    cfg_scale: float | None = None
    # Temporal guidance (chaid/engine/sampler.py, Guidance): each step is also pushed away
    # from what the model draws with its temporal attention off, by this much. 0 turns it
    # off; it costs one more model row per request and step (1.5x a guided step). On
    # tiny-shapes sampled with the ODE (eta = 0) 1.0 stops objects changing shape mid-clip
    # (docs/shapes.md, "Visible defects").
    temporal_guidance: float = 0.0
    # Share of fresh noise in each step, 0..1 (chaid/engine/sampler.py, stochastic_step):
    # 0 integrates the ODE with Euler steps; 1 re-draws all of each step's noise. Unset:
    # the model's own (`chaid models list`).
    eta: float | None = None
    # Steps at a timestep t (1000 = pure noise) at or below this are Euler steps whatever
    # eta says: fresh noise helps lay out the clip early on and costs detail late.
    # Unset: the model's own.
    eta_until: float | None = None


CACHE_ATTENTION_CHOICES = ("auto", "on", "off")


@dataclass(frozen=True)
class ChaiSettings:
    # Steps of a cache miss (full mode); its latents at cache_steps are what a hit reuses.
    full_steps: int = 30
    # Steps of a cache hit (fast mode): fewer is faster and, past a point, visibly worse.
    fast_steps: int = 8
    # Whether a hit's fast steps use Cache Attention on the entry's latents: "on", "off"
    # (a hit is plain sampling at fast_steps; the entry's latents are not read), or "auto",
    # the model preset's measured choice (on for OpenSora, off for tiny-shapes).
    cache_attention: str = "auto"
    # 1-based denoising steps whose first block attends to the cached latent of the same step.
    cache_steps: tuple[int, ...] = (2, 3, 4)
    # Spatial blocks that run Cache Attention; more blocks pull harder toward the cached video.
    cache_blocks: tuple[int, ...] = (0,)
    # "both": both guidance branches attend to the cache; "cond": only the prompt branch.
    branches: str = "both"
    # "cache": keys/values from the cached latent only; "cache+current": both token sets.
    kv_source: str = "cache"
    # Strength of Cache Attention: a block's attention output is
    # self + blend * (cache - self); 1.0 is the paper's (cache only), 0.0 plain sampling.
    blend: float = 1.0
    # "auto" uses the CuPy kernel on a GPU when available; "reference" or "cupy" force one.
    kernel: str = "auto"
    # Cache a miss whose prompt names nothing the model can draw (a model with a closed
    # vocabulary, like tiny-shapes, shows something else): off keeps such videos out of the
    # cache, so no later prompt reuses them; the video is returned either way.
    cache_undrawable: bool = False


# Where the systemd socket unit puts the daemon's socket; clients look here by default.
DEFAULT_SOCKET = Path("/run/chaid/chaid.sock")


@dataclass(frozen=True)
class ServerSettings:
    # The Unix socket the daemon binds when systemd hands it none (socket activation wins).
    socket: Path = DEFAULT_SOCKET
    # Octal file mode of a bound socket: who may connect at all. 0660 admits the owner and
    # the socket group; 0666 leaves access to the peer-credential check alone.
    socket_mode: str = "0660"
    # Group (name or gid) given to a bound socket; None keeps the daemon's primary group.
    socket_group: str | None = None
    # Users (names or uids) and groups allowed to send requests. Both empty: every peer
    # that the socket's file mode lets in. root and the daemon's own user are always allowed.
    allowed_users: tuple[str, ...] = ()
    allowed_groups: tuple[str, ...] = ()
    # Users and groups allowed cache.evict/clear/warm. Both empty: only root and the
    # daemon's own user. Admins must also be allowed.
    admin_users: tuple[str, ...] = ()
    admin_groups: tuple[str, ...] = ()
    # Whether every allowed user may read every cached prompt: true, cache.list shows all
    # entries and a hit names the cached prompt and entities. false: a non-admin sees the
    # prompts of the entries its own uid made and no other (a hit on another user's entry
    # reports its id and score, not its text); the cache itself stays shared.
    share_prompts: bool = True
    # Largest request frame accepted. Requests carry a prompt and a few numbers; 1 MiB is
    # generous and bounds the memory a hostile client can make the daemon buffer.
    max_message_bytes: int = 1 << 20
    # Longest prompt (characters); longer text is beyond every text encoder's context.
    max_prompt_chars: int = DEFAULT_LIMITS.max_prompt_chars
    # Bounds of generate parameters: they cap the device time and memory one request takes
    # (at most chaid.limits' ceilings).
    max_frames: int = DEFAULT_LIMITS.max_frames
    max_side: int = DEFAULT_LIMITS.max_side
    max_steps: int = DEFAULT_LIMITS.max_steps
    # Admission by cost (chaid.engine.cost): a request whose estimated device time (steps
    # and decode, timed on this device at start-up) exceeds max_request_s, or whose
    # estimated activation memory exceeds max_request_memory_mb, is refused ("too_large")
    # before it runs. 0 MB: 90% of a GPU's free memory after loading, half of a CPU
    # machine's available memory.
    max_request_s: float = 300.0
    max_request_memory_mb: int = 0
    # Generations waiting for the device; one more is answered "busy" at once, so a client
    # learns to back off instead of queueing behind minutes of work.
    queue_size: int = 16
    # Requests one connection may have in flight; more is "too_many_requests".
    max_inflight_per_connection: int = 8
    # Open connections; more are answered "busy" and closed.
    max_connections: int = 128
    # Open connections of one user (peer uid); more are answered "too_many_connections"
    # and closed, so one local user cannot take every slot of max_connections. A quarter
    # of them leaves room for others; root and the daemon's own user are exempt.
    max_connections_per_user: int = 32
    # Requests per second each user may send (a token bucket of rate_burst tokens); root
    # and the daemon's own user are exempt, and so are ping and cancel. It bounds the CPU
    # one local user can take with lookups; 0 turns the limit off.
    rate_per_s: float = 20.0
    rate_burst: int = 100
    # A frame that has started must arrive whole within this many seconds (slow-loris guard).
    read_timeout_s: float = 10.0
    # A client that does not read its responses for this long is disconnected. Each frame
    # must be written within it (a raw video of a few hundred MB needs a reading client,
    # not a stalled one), and responses wait for the writer within a byte budget.
    write_timeout_s: float = 60.0
    # A connection with no request in flight that sends nothing for this long is closed,
    # freeing its slot. Longer keeps idle clients' connections warm (the client reconnects
    # transparently anyway); shorter frees slots held by forgotten clients sooner.
    idle_timeout_s: float = 300.0
    # Default and largest per-request deadline (queue wait + generation), in seconds.
    request_timeout_s: float = DEFAULT_LIMITS.max_deadline_s
    # On SIGTERM, in-flight requests get this long to finish before they are cancelled.
    grace_period_s: float = 30.0
    # Threads for cache lookups (spaCy + MiniLM on the CPU), apart from the device worker.
    lookup_threads: int = 2
    # torch intra-op threads of the whole process (also `chaid generate`'s). 0: automatic,
    # 1 for a small model on the CPU (more threads lose 2-2.5x beside other busy work and
    # gain 1.5x on an idle machine), torch's default (every core) otherwise.
    torch_threads: int = 0
    # Devices with one worker (and one model replica) each, sharing the queue and the store.
    # Empty: every visible GPU when model.device is "auto", else model.device.
    devices: tuple[str, ...] = ()
    # Workers on a CPU device: each runs its own model replica on torch_threads threads,
    # so a small model uses N cores as N workers of one thread (tiny-shapes: docs/deploy.md).
    cpu_workers: int = 1
    # Most jobs one worker denoises together, one model call per step for all of them
    # (chaid/engine/worker.py). 0: the measured choice for the device kind
    # (BATCH_BY_DEVICE: 1, no batching, on the CPU, where batches measured no faster; 1 on
    # a GPU until its batch curve, `make gpu-check`, is measured there). 1 runs jobs one at
    # a time.
    max_batch: int = 0
    # "text" for people, "json" for log collectors (one object per line).
    log_format: str = "text"
    # Lowest level logged: debug, info, warning, error.
    log_level: str = "info"

    @property
    def socket_mode_bits(self) -> int:
        return int(self.socket_mode, 8)

    @property
    def limits(self) -> RequestLimits:
        """The bounds the daemon holds requests to (the protocol checks them)."""
        return RequestLimits(self.max_prompt_chars, self.max_frames, self.max_side,
                             self.max_steps, self.request_timeout_s)


@dataclass(frozen=True)
class Settings:
    model: ModelSettings = field(default_factory=ModelSettings)
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    chai: ChaiSettings = field(default_factory=ChaiSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    store: StoreSettings = field(default_factory=StoreSettings)

    def validate(self) -> Settings:
        """Return self if every value is in range, else raise ConfigError."""
        if self.model.device not in ("auto", "cpu", "cuda") and not self.model.device.startswith(
            "cuda:"
        ):
            raise ConfigError(
                f"model.device must be auto, cpu, cuda or cuda:N, not {self.model.device!r}"
            )
        check_choice("model.text_dtype", self.model.text_dtype, sorted(DTYPE_NAMES), ConfigError)
        check_choice("model.text_after_encode", self.model.text_after_encode, TEXT_AFTER_ENCODE,
                     ConfigError)
        check_choice("model.dtype", self.model.dtype, sorted(DTYPE_NAMES), ConfigError)
        check_choice("model.numerics", self.model.numerics, NUMERICS_CHOICES, ConfigError)
        check_int("sampler.steps", self.sampler.steps, 1, MAX_STEPS, ConfigError)
        check_number("sampler.temporal_guidance", self.sampler.temporal_guidance, 0.0,
                     MAX_CFG_SCALE, error=ConfigError)
        if self.sampler.eta is not None:
            check_number("sampler.eta", self.sampler.eta, 0.0, 1.0, error=ConfigError)
        if self.sampler.eta_until is not None:
            check_number("sampler.eta_until", self.sampler.eta_until, 0.0, 1000.0,
                         error=ConfigError)
        if self.sampler.cfg_scale is not None:
            check_number("sampler.cfg_scale", self.sampler.cfg_scale, 0.0, MAX_CFG_SCALE,
                         error=ConfigError)
        chai = self.chai
        for name in ("full_steps", "fast_steps"):
            check_int(f"chai.{name}", getattr(chai, name), 1, MAX_STEPS, ConfigError)
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
        check_number("chai.blend", chai.blend, 0.0, 2.0, error=ConfigError)
        for name, allowed in (
            ("branches", ("both", "cond")),
            ("kv_source", ("cache", "cache+current")),
            ("cache_attention", CACHE_ATTENTION_CHOICES),
            ("kernel", ("auto", "reference", "cupy")),
        ):
            check_choice(f"chai.{name}", getattr(chai, name), allowed, ConfigError)
        self._validate_server()
        try:
            self.store.validate()
        except StoreError as exc:
            raise ConfigError(str(exc)) from None
        return self

    def _validate_server(self) -> None:
        srv = self.server
        mode = srv.socket_mode
        if not (1 <= len(mode) <= 4 and all(c in "01234567" for c in mode)):
            raise ConfigError(f"server.socket_mode must be an octal mode like 0660, not {mode!r}")
        for name in ("max_message_bytes", "queue_size", "max_inflight_per_connection",
                     "max_connections", "max_connections_per_user", "lookup_threads"):
            if getattr(srv, name) < 1:
                raise ConfigError(f"server.{name} must be at least 1, not {getattr(srv, name)}")
        for name, ceiling in (("max_prompt_chars", MAX_PROMPT_CHARS), ("max_frames", MAX_FRAMES),
                              ("max_side", MAX_SIDE), ("max_steps", MAX_STEPS)):
            check_int(f"server.{name}", getattr(srv, name), 1, ceiling, ConfigError)
        check_int("server.max_request_memory_mb", srv.max_request_memory_mb, 0, 1 << 30,
                  ConfigError)
        for name in ("read_timeout_s", "write_timeout_s", "idle_timeout_s",
                     "request_timeout_s", "max_request_s"):
            if not getattr(srv, name) > 0:
                raise ConfigError(f"server.{name} must be positive, not {getattr(srv, name)}")
        if srv.grace_period_s < 0:
            raise ConfigError(f"server.grace_period_s must be >= 0, not {srv.grace_period_s}")
        if srv.rate_per_s < 0 or srv.rate_burst < 1:
            raise ConfigError("server.rate_per_s must be >= 0 and server.rate_burst >= 1")
        check_int("server.cpu_workers", srv.cpu_workers, 1, 64, ConfigError)
        check_int("server.max_batch", srv.max_batch, 0, 64, ConfigError)
        for device in srv.devices:
            if device != "cpu" and device != "cuda" and not device.startswith("cuda:"):
                raise ConfigError(f"server.devices: {device!r} is not cpu, cuda or cuda:N")
        if srv.torch_threads < 0:
            raise ConfigError(f"server.torch_threads must be >= 0, not {srv.torch_threads}")
        if srv.log_format not in ("text", "json"):
            raise ConfigError(f"server.log_format must be text or json, not {srv.log_format!r}")
        if srv.log_level not in ("debug", "info", "warning", "error"):
            raise ConfigError(
                f"server.log_level must be debug, info, warning or error, not {srv.log_level!r}"
            )
        if srv.max_steps < self.chai.full_steps:
            raise ConfigError("server.max_steps must be at least chai.full_steps")


# What a large text encoder does after encoding (chaid.models.t5).
TEXT_AFTER_ENCODE = ("keep", "offload", "free")
# dtype names accepted in settings; the engine maps them to torch dtypes.
DTYPE_NAMES = {"float32", "float16", "bfloat16"}
# A request's cfg_scale meaning "the model preset's guidance scale" (ModelSpec.cfg_scale).
MODEL_CFG_SCALE = "model"


def load_settings(
    config_file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Settings:
    """Build validated Settings from a TOML file, the environment and explicit overrides.

    Args:
        config_file: a TOML file with ``[model]``, ``[sampler]``, ``[chai]``, ``[server]``
            and ``[store]`` tables, or None.
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
    "server": ServerSettings,
    "store": StoreSettings,
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
