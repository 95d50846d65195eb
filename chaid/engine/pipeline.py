"""One-shot generation: prompt → text states → noise → rectified flow → decode → frames.

A :class:`Pipeline` holds the model parts of one preset on one device and is stateless
between requests: everything a request needs (its seed, its hook, its timings) lives in
the call, so one pipeline can serve requests one after another from any thread.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from chaid.checks import check_int, check_number
from chaid.config import MODEL_CFG_SCALE, ChaiSettings, Settings
from chaid.engine.cache_attention import CacheAttention, batch_plan
from chaid.engine.intra_cache import FirstBlockCache, IntraCacheSettings, make_intra_cache
from chaid.engine.sampler import (
    Guidance,
    StepHook,
    euler_step,
    guidance_rows,
    run_schedule,
    step_noise,
    stochastic_step,
)
from chaid.errors import InputError
from chaid.limits import (
    MAX_CFG_SCALE,
    MAX_FPS,
    MAX_FRAMES,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    MIN_SIDE,
)
from chaid.models import ModelParts, build_model, build_parts
from chaid.models.shapes_vocab import Understanding
from chaid.models.text import TextEmbedding
from chaid.modes import RunKind, hit_attends, steps_for
from chaid.numerics import Numerics, as_seen

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    # None: the model preset's default video size and rate.
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    fps: int | None = None
    steps: int = 30
    # None: no guidance (conditional branch only, half the compute); MODEL_CFG_SCALE: the
    # model preset's scale (ModelSpec.cfg_scale).
    cfg_scale: float | str | None = MODEL_CFG_SCALE
    seed: int = 0
    # Fast mode: step k → cached z_k of an earlier full run; Cache Attention runs at the
    # pipeline's cache_steps with these. None: plain self-attention everywhere.
    cache_latents: Mapping[int, torch.Tensor] | None = field(default=None, repr=False)
    # 1-based steps whose input latent z_k is returned in the result (full mode: 2, 3, 4).
    capture_steps: tuple[int, ...] = ()
    # Start at this 1-based step of the ``steps``-step schedule from ``start_latent`` (C, T,
    # H, W) instead of step 1 from the seed's noise (NIRVANA-VID's latent substitution).
    # Steps before it are not run. start_step 1 with start_latent None is a plain run.
    start_step: int = 1
    start_latent: torch.Tensor | None = field(default=None, repr=False)
    # Intra-inference cache (First-Block-Cache) for this request; None: every block runs.
    intra_cache: IntraCacheSettings | None = None


@dataclass
class Timings:
    encode_ms: float = 0.0
    denoise_ms: float = 0.0
    decode_ms: float = 0.0
    total_ms: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 1) for k, v in asdict(self).items()}


@dataclass
class GenerationResult:
    video: np.ndarray  # (F, H, W, 3) uint8 RGB
    latent: torch.Tensor  # (C, T, h, w) fp32 on the CPU: the final denoised latent
    steps: int
    fps: int
    timings: Timings
    # FAST (Cache Attention used), FULL (latents captured for the cache) or PLAIN.
    run: RunKind = RunKind.PLAIN
    # step k → z_k (C, T, h, w) fp32 on the CPU, for the request's capture_steps.
    captured: dict[int, torch.Tensor] = field(default_factory=dict)
    # The step the run started at (1 unless it continued a stored latent).
    start_step: int = 1
    # Steps whose blocks after the first were skipped by the intra cache.
    intra_skipped: tuple[int, ...] = ()

    @property
    def steps_run(self) -> int:
        """Model calls made: the schedule's steps from start_step on."""
        return self.steps - self.start_step + 1


@dataclass(eq=False)
class Run:
    """One request on its way through the sampler, one step at a time
    (:meth:`Pipeline.start`, :meth:`Pipeline.step`, :meth:`Pipeline.finish`). Everything
    the request's denoising needs lives here, so the runs of several requests can be
    stepped in any interleaving, together or apart, on one pipeline."""

    request: GenerationRequest  # resolved
    text: TextEmbedding
    guidance: Guidance  # of this request alone
    z: torch.Tensor  # (1, C, T, h, w) fp32: the latent fed to the next step
    timesteps: list[float]
    index: int  # 0-based index of the next step in timesteps
    attention: CacheAttention | None = None
    intra: FirstBlockCache | None = None
    captured: dict[int, torch.Tensor] = field(default_factory=dict)
    timings: Timings = field(default_factory=Timings)

    @property
    def done(self) -> bool:
        return self.index >= len(self.timesteps)

    @property
    def step_number(self) -> int:
        """The 1-based step run next."""
        return self.index + 1

    @property
    def t(self) -> float:
        return self.timesteps[self.index]

    @property
    def t_next(self) -> float:
        return self.timesteps[self.index + 1] if self.index + 1 < len(self.timesteps) else 0.0

    @property
    def batch_key(self) -> tuple | None:
        """What one model call shares: runs with equal keys batch together (each row with
        its own timestep, prompt, noise and Cache Attention). None: this run steps alone:
        the intra cache decides per call whether to skip blocks, and a step with a Cache
        Attention plan leaves temporal guidance out (Guidance), which would change the
        other rows of the call."""
        req = self.request
        if self.intra is not None or (self.attention is not None
                                      and self.guidance.temporal_scale):
            return None
        return (tuple(self.z.shape), req.fps, req.height, req.width, req.cfg_scale)

    def batches_with(self, other: Run) -> bool:
        return self.batch_key is not None and self.batch_key == other.batch_key


# A DiT below this many parameters runs on one CPU thread by default: its matrices are too
# small for more threads to pay, and beside other busy processes spinning OpenMP threads
# cost 2-2.5x (tiny-shapes, 30 steps on 2 cores: 1.3 s with 1 thread and 2.5-3.3 s with 2
# beside one busy process; 1.25 s and 0.8 s on an idle machine; docs/deploy.md).
SMALL_MODEL_PARAMS = 50_000_000


def torch_threads_for(settings: Settings) -> int:
    """The torch intra-op threads a process serving ``settings`` should use (0: torch's
    default): ``server.torch_threads`` when set, else 1 for a small model on the CPU."""
    if settings.server.torch_threads:
        return settings.server.torch_threads
    if resolve_device(settings.model.device).type != "cpu":
        return 0
    dit = build_model(settings.model.name, device="meta")
    return 1 if sum(p.numel() for p in dit.parameters()) < SMALL_MODEL_PARAMS else 0


def apply_torch_threads(settings: Settings) -> int:
    """Set torch's threads as :func:`torch_threads_for` says; returns the count in use."""
    threads = torch_threads_for(settings)
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def worker_devices(settings: Settings) -> list[str]:
    """One device per worker: ``server.devices``, else every visible GPU when
    ``model.device`` is "auto", else ``model.device``; a CPU device appears
    ``server.cpu_workers`` times."""
    devices = list(settings.server.devices)
    if not devices:
        if settings.model.device == "auto" and torch.cuda.device_count() > 0:
            devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        else:
            devices = [str(resolve_device(settings.model.device))]
    out = []
    for name in devices:
        out += [name] * (settings.server.cpu_workers if name == "cpu" else 1)
    return out


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested but torch sees no CUDA device")
    return device


class Pipeline:
    def __init__(
        self, parts: ModelParts, device: torch.device, chai: ChaiSettings | None = None,
        temporal_guidance: float = 0.0, eta: float | None = None,
        eta_until: float | None = None,
    ) -> None:
        self.parts = parts
        self.device = device
        self.chai = chai or ChaiSettings()
        # sampler.temporal_guidance: the temporal guidance scale of every run (0: off)
        self.temporal_guidance = temporal_guidance
        # sampler.eta: the share of fresh noise in each step (sampler.stochastic_step; 0:
        # the Euler steps of the ODE); None: the preset's
        self.eta = parts.spec.eta if eta is None else eta
        # sampler.eta_until: steps at t at or below it are Euler steps; None: the preset's
        self.eta_until = parts.spec.eta_until if eta_until is None else eta_until

    @property
    def sampler(self) -> dict[str, float]:
        """The sampler settings every run of this pipeline takes (``[sampler]`` besides
        steps and guidance, which a request carries)."""
        return {"temporal_guidance": self.temporal_guidance, "eta": self.eta,
                "eta_until": self.eta_until}

    @property
    def hit_attends(self) -> bool:
        """Whether a hit's fast steps run Cache Attention (``chai.cache_attention``)."""
        return hit_attends(self.chai, self.parts.spec.cache_attention)

    @classmethod
    def from_settings(cls, settings: Settings) -> Pipeline:
        device = resolve_device(settings.model.device)
        parts = build_parts(
            settings.model.name,
            settings.model.weights,
            device=device,
            dtype=DTYPES[settings.model.dtype],
            text_dtype=DTYPES[settings.model.text_dtype],
            text_after_encode=settings.model.text_after_encode,
            numerics=settings.model.numerics,
        )
        sampler = settings.sampler
        return cls(parts, device, settings.chai, sampler.temporal_guidance, sampler.eta,
                   sampler.eta_until)

    def resolve(self, request: GenerationRequest) -> GenerationRequest:
        """Fill defaults from the preset and validate every field against the ceilings of
        :mod:`chaid.limits`; InputError if invalid."""
        spec = self.parts.spec
        if not isinstance(request.prompt, str) or not request.prompt.strip():
            raise InputError("prompt must be a non-empty string")
        if len(request.prompt) > MAX_PROMPT_CHARS:
            raise InputError(
                f"prompt is {len(request.prompt)} characters; the limit is {MAX_PROMPT_CHARS}"
            )
        frames = check_int(
            "frames", spec.frames if request.frames is None else request.frames, 1, MAX_FRAMES
        )
        height = check_int(
            "height", spec.height if request.height is None else request.height, MIN_SIDE,
            MAX_SIDE
        )
        width = check_int(
            "width", spec.width if request.width is None else request.width, MIN_SIDE, MAX_SIDE
        )
        fps = check_int("fps", spec.fps if request.fps is None else request.fps, 1, MAX_FPS)
        self.parts.vae.latent_shape(frames, height, width)  # raises InputError if unsupported
        steps = check_int("steps", request.steps, 1, MAX_STEPS)
        seed = check_int("seed", request.seed, 0, MAX_SEED)
        scale = request.cfg_scale
        if scale == MODEL_CFG_SCALE:
            scale = spec.cfg_scale
        if scale is not None:
            scale = check_number("cfg_scale", scale, 0.0, MAX_CFG_SCALE)
        start = check_int("start_step", request.start_step, 1, steps)
        if request.start_latent is not None:
            shape = tuple(self.parts.vae.latent_shape(frames, height, width))
            if tuple(request.start_latent.shape) != shape:
                raise InputError(
                    f"start_latent has shape {tuple(request.start_latent.shape)},"
                    f" the request {shape}"
                )
        elif start > 1:
            raise InputError("start_step > 1 needs a start_latent")
        if start > 1 and request.cache_latents is not None:
            raise InputError("start_step > 1 cannot be combined with cache_latents")
        if request.intra_cache is not None:
            request.intra_cache.validate()
        capture = tuple(sorted(set(request.capture_steps)))
        if any(
            isinstance(k, bool) or not isinstance(k, int) or not start <= k <= steps
            for k in capture
        ):
            raise InputError(
                f"capture_steps must be steps in {start}..{steps},"
                f" not {list(request.capture_steps)}"
            )
        return dataclasses.replace(
            request,
            frames=frames,
            height=height,
            width=width,
            fps=fps,
            steps=steps,
            cfg_scale=scale,
            seed=seed,
            capture_steps=capture,
            start_step=start,
        )

    def for_run(self, request: GenerationRequest, run: RunKind,
                cached: Mapping[int, torch.Tensor] | None = None) -> GenerationRequest:
        """``request`` set up for a kind of run (:mod:`chaid.modes`): FAST runs the fast
        steps, with Cache Attention on ``cached`` where :attr:`hit_attends`; FULL runs the
        full steps and captures the latents a later hit reuses; PLAIN runs the request's
        own steps, nothing cached."""
        steps = steps_for(run, self.chai, request.steps)
        if run is RunKind.FAST:
            return dataclasses.replace(request, steps=steps, capture_steps=(),
                                       cache_latents=cached if self.hit_attends else None)
        if run is RunKind.FULL:
            return dataclasses.replace(request, steps=steps, cache_latents=None,
                                       capture_steps=tuple(self.chai.cache_steps))
        return request

    def full(self, prompt: str, **fields) -> GenerationResult:
        """A cache miss: full_steps steps, capturing the latents a later hit reuses."""
        return self.generate(self.for_run(GenerationRequest(prompt, **fields), RunKind.FULL))

    def fast(self, prompt: str, cached: Mapping[int, torch.Tensor], **fields) -> GenerationResult:
        """A cache hit: fast_steps steps with Cache Attention on the cached latents."""
        return self.generate(self.for_run(GenerationRequest(prompt, **fields), RunKind.FAST,
                                          cached))

    def understand(self, prompt: str) -> Understanding | None:
        """What the model can use of ``prompt`` (None for a model without a vocabulary)."""
        understand = self.parts.spec.understand
        return None if understand is None else understand(prompt)

    def seen_size(self, request: GenerationRequest) -> tuple[float, float]:
        """The height and width the DiT's position embedding sees: the request's, or with
        upstream numerics as a model-dtype tensor holds them (854 is 856 in bf16)."""
        if self.parts.numerics is not Numerics.UPSTREAM:
            return request.height, request.width
        dtype = self.parts.dit.dtype
        return as_seen(request.height, dtype), as_seen(request.width, dtype)

    def initial_noise(self, request: GenerationRequest) -> torch.Tensor:
        """z_1 for a resolved request: drawn on the CPU from the seed, so every device
        starts from the same noise. With upstream numerics it is rounded to the model
        dtype, as upstream draws it in that dtype (its values differ: upstream draws on the
        device from a global seed)."""
        shape = self.parts.vae.latent_shape(request.frames, request.height, request.width)
        gen = torch.Generator(device="cpu").manual_seed(request.seed)
        noise = torch.randn((1, *shape), generator=gen)
        if self.parts.numerics is Numerics.UPSTREAM:
            noise = noise.to(self.parts.dit.dtype).float()
        return noise.to(self.device)

    def _decode(self, z: torch.Tensor, frames: int) -> np.ndarray:
        """Latent (1, C, T, h, w) → video (F, H, W, 3) uint8."""
        video = self.parts.vae.decode(z, frames)[0]  # (3, F, H, W) in [-1, 1]
        video = ((video.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        return video.permute(1, 2, 3, 0).cpu().numpy()

    def _timesteps(self, req: GenerationRequest, latent_frames: int) -> list[float]:
        parts = self.parts
        return run_schedule(
            req.steps, height=req.height, width=req.width, frames=req.frames,
            latent_frames=latent_frames, numerics=parts.numerics, size_dtype=parts.dit.dtype,
            base_side=parts.dit.cfg.input_sq_size,
        )

    @torch.inference_mode()
    def start(self, request: GenerationRequest) -> Run:
        """A :class:`Run` of ``request`` at its first step: the request resolved (InputError
        before any model work if invalid, cached latents of the wrong shape included), its
        text encoded, its starting latent and schedule made."""
        req = self.resolve(request)
        parts = self.parts
        height, width = self.seen_size(req)
        attention = None
        if req.cache_latents is not None:
            attention = CacheAttention(parts.dit, req.cache_latents, self.chai, height, width,
                                       req.cfg_scale is not None)
            attention.check(parts.vae.latent_shape(req.frames, req.height, req.width))
        intra = make_intra_cache(req.intra_cache) if req.intra_cache is not None else None
        t_start = time.perf_counter()
        text = parts.text_encoder.encode([req.prompt]).to(self.device)
        self._sync()
        encode_ms = (time.perf_counter() - t_start) * 1000
        if req.start_latent is not None:
            z = req.start_latent.to(self.device, torch.float32)[None]
        else:
            z = self.initial_noise(req).float()
        timesteps = self._timesteps(req, z.shape[2])
        guidance = self._guidance(text, req, height, width)
        return Run(req, text, guidance, z, timesteps, req.start_step - 1, attention, intra,
                   timings=Timings(encode_ms=encode_ms))

    @torch.inference_mode()
    def step(self, runs: list[Run]) -> None:
        """The next denoising step of every run in ``runs``, in one DiT call: each row at
        its own timestep, with its own prompt and its own Cache Attention (a hit's rows
        attend to its entry's latent at its cache steps, the others to themselves). The
        runs must be :meth:`Run.batches_with` each other (a run with the intra cache steps
        alone); ValueError otherwise. A run whose step is in its capture steps keeps its
        input latent first."""
        if not runs:
            return
        if any(run.done for run in runs):
            raise ValueError("a finished run has no next step")
        first = runs[0]
        if len(runs) > 1 and not all(first.batches_with(run) for run in runs[1:]):
            raise ValueError("these runs cannot share a model call")
        t0 = time.perf_counter()
        for run in runs:
            if run.step_number in run.request.capture_steps:
                run.captured[run.step_number] = run.z[0].float().cpu().clone()
        if len(runs) == 1:  # its own guidance, and its intra cache (which never batches)
            z, t, guidance = first.z, first.t, first.guidance
            runner = first.intra.runner(first.step_number) if first.intra else None
        else:
            z = torch.cat([run.z for run in runs])
            t = torch.tensor([run.t for run in runs], device=self.device)
            text = TextEmbedding(torch.cat([run.text.states for run in runs]),
                                 torch.cat([run.text.mask for run in runs]))
            guidance = self._guidance(text, first.request, first.guidance.height,
                                      first.guidance.width)
            runner = None
        plan = None
        if any(run.attention is not None for run in runs):
            # laid out for the guidance rows (temporal guidance is left out of the steps
            # that carry a plan: Guidance)
            plan = batch_plan([run.attention for run in runs],
                              [run.step_number for run in runs],
                              guidance_rows(first.request.cfg_scale), self.device)
        v = guidance.velocity(z, t, plan, runner)
        for row, run in enumerate(runs):
            run.z = self._advance(run, v[row:row + 1])
            run.index += 1
        self._sync()
        elapsed = (time.perf_counter() - t0) * 1000
        for run in runs:
            run.timings.denoise_ms += elapsed

    @torch.inference_mode()
    def finish(self, run: Run) -> GenerationResult:
        """The result of a finished run: its latent decoded."""
        if not run.done:
            raise ValueError(f"the run is at step {run.step_number} of {len(run.timesteps)}")
        t0 = time.perf_counter()
        video = self._decode(run.z, run.request.frames)
        timings = run.timings
        timings.decode_ms = (time.perf_counter() - t0) * 1000
        timings.total_ms = timings.encode_ms + timings.denoise_ms + timings.decode_ms
        req = run.request
        kind = (RunKind.FAST if run.attention else
                RunKind.FULL if req.capture_steps else RunKind.PLAIN)
        return GenerationResult(video, run.z[0].float().cpu(), req.steps, req.fps, timings,
                                kind, run.captured, start_step=req.start_step,
                                intra_skipped=tuple(run.intra.skipped) if run.intra else ())

    def generate_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Several requests denoised together: at each iteration one DiT call runs the next
        step of every request not yet done (:meth:`step`); a request of fewer steps leaves
        the batch when it is done. The results are those of :meth:`generate` for each
        request alone, to float rounding (a batched matmul sums in another order).

        The requests must batch with each other (:meth:`Run.batches_with`: the latent
        shape, fps, size and guidance scale shared; no intra cache): InputError otherwise,
        before any denoising.
        """
        runs = [self.start(r) for r in requests]
        if len(runs) > 1 and not all(runs[0].batches_with(r) for r in runs[1:]):
            keys = sorted({r.batch_key for r in runs}, key=str)
            raise InputError("requests batched together must share frames, size, fps and "
                             "guidance, and none may use the intra cache (or Cache Attention "
                             f"under temporal guidance); got {keys}")
        while active := [r for r in runs if not r.done]:
            self.step(active)
        return [self.finish(r) for r in runs]

    @torch.inference_mode()
    def replay(self, request: GenerationRequest, latent: torch.Tensor) -> GenerationResult:
        """The video of a resolved request from its final latent (an identical request's,
        stored): the decode alone, no denoising. The video is the one that request got."""
        t0 = time.perf_counter()
        video = self._decode(latent.to(self.device, torch.float32)[None], request.frames)
        total = (time.perf_counter() - t0) * 1000
        return GenerationResult(video, latent.float().cpu(), 0, request.fps,
                                Timings(decode_ms=total, total_ms=total), RunKind.REPLAY)

    def generate(
        self, request: GenerationRequest, on_step: StepHook | None = None
    ) -> GenerationResult:
        """Run one request to completion.

        ``on_step(k, t_k, z_k)`` is called before each denoising step; whatever it raises
        stops the run and propagates (nothing is kept). Raises InputError for an invalid
        request (including cached latents of the wrong shape) before any model work.
        """
        run = self.start(request)
        while not run.done:
            if on_step is not None:
                on_step(run.step_number, run.t, run.z)
            self.step([run])
        result = self.finish(run)
        log.debug("generated %r in %.0f ms (%d steps)", run.request.prompt,
                  result.timings.total_ms, run.request.steps)
        return result

    def _advance(self, run: Run, v: torch.Tensor) -> torch.Tensor:
        """The run's next latent from its velocity: an Euler step, or a stochastic one
        under ``eta`` (the last step, to t = 0, draws no noise either way)."""
        if not self.eta or run.t_next == 0 or run.t <= self.eta_until:
            return euler_step(run.z, v, run.t, run.t_next)
        noise = step_noise(run.request.seed, run.step_number, tuple(run.z.shape))
        return stochastic_step(run.z, v, run.t, run.t_next, self.eta,
                               noise.to(self.device, run.z.dtype))

    def _guidance(self, text: TextEmbedding, req: GenerationRequest, height: float,
                  width: float) -> Guidance:
        return Guidance(self.parts.dit, text, req.cfg_scale, req.fps, height, width,
                        self.temporal_guidance)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
