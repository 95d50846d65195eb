"""Admission by cost: what a request will take of the device, known before it runs.

The shape bounds of :mod:`chaid.limits` (frames, sides, steps) each allow a lot, and their
product allows far too much: 256 frames of 1024x1024 for one step is half a million DiT
tokens, minutes per forward and gigabytes of activations. The daemon therefore estimates
each request's cost from its latent size, its steps and the model, and refuses one that
exceeds a ceiling before any work is done.

- **Work.** The STDiT's multiply-adds per forward follow from its shapes: per block pair
  and token, the linear layers of self-attention, cross-attention and the MLP
  (``(12 + 4r) C²`` with MLP ratio ``r``), spatial and temporal attention (``2C(S + T)``
  for ``S`` tokens per frame and ``T`` frames) and cross-attention over the caption; the
  caption's keys and values once per sample. Guidance doubles the batch, temporal guidance
  adds a third row. The VAE decode is counted in pixels.
- **Speed.** :meth:`CostModel.calibrate` times a forward and a decode of the model's
  default request and of one with twice the sides on the serving device (after warm-up
  calls) and fits each to a call's fixed overhead plus a throughput (FLOPs per second,
  pixels per second), so the estimate is in seconds of *this* device. Timed under load,
  the estimate is pessimistic: a request may be refused that would have fit.
- **Memory.** The peak of one forward is dominated by a block's activations:
  ``batch · tokens · C · (r + 6)`` elements of the model's dtype (the MLP's hidden layer,
  q, k, v, the attention output and the residual stream). The VAE's working memory is not
  modelled (the OpenSora VAE decodes in micro-batches; the Shapes VAE is small beside the
  DiT); the decoded video in float32 is.

The estimate is a bound of the right order, not a prediction to the percent: it is used to
refuse requests that could never finish (or would take the device for minutes), with the
figures in the error so that the caller can ask for less.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from chaid.engine.pipeline import GenerationRequest, Pipeline
from chaid.engine.sampler import Guidance, guidance_rows
from chaid.errors import ChaidError
from chaid.limits import MAX_SIDE

log = logging.getLogger(__name__)

# Activations alive at the peak of one block, in units of tokens x hidden size, beside the
# MLP ratio's hidden layer: q, k, v, the attention output, the residual and its norm.
ACTIVATION_WIDTHS = 6
# Share of the memory found at start-up that requests may take when no ceiling is set:
# on a GPU the rest of its free memory after the weights; on a CPU, of the memory the
# machine has available (the store's pages, the page cache and other processes need room).
AUTO_MEMORY_SHARE = {"cuda": 0.9, "cpu": 0.5}


@dataclass(frozen=True)
class Cost:
    """What one request takes; ``seconds`` is None before calibration."""

    tokens: int  # DiT tokens per sample
    forwards: int  # DiT forward calls (one per step; guidance batches both branches)
    flops: float  # DiT floating-point operations, all steps and branches
    pixels: int  # decoded frames x height x width
    memory_bytes: int
    seconds: float | None

    def as_dict(self) -> dict[str, float | int | None]:
        return {"tokens": self.tokens, "steps": self.forwards, "tflops": round(self.flops / 1e12, 3),
                "memory_mb": round(self.memory_bytes / 2**20, 1),
                "estimated_s": None if self.seconds is None else round(self.seconds, 2)}


@dataclass(frozen=True)
class Linear:
    """Seconds of a call as ``fixed + amount / rate`` (a call's overhead, then throughput)."""

    fixed_s: float
    rate: float

    @classmethod
    def fit(cls, small: tuple[float, float], big: tuple[float, float]) -> Linear:
        """From (amount, seconds) of a small and a big call; a big call that was not
        slower (noise) leaves no overhead and the big call's throughput."""
        (a1, t1), (a2, t2) = small, big
        if t2 <= t1 or a2 <= a1:
            return cls(0.0, a2 / t2)
        rate = (a2 - a1) / (t2 - t1)
        return cls(max(0.0, t1 - a1 / rate), rate)

    def seconds(self, amount: float, calls: int = 1) -> float:
        return calls * self.fixed_s + amount / self.rate


@dataclass(frozen=True)
class Calibration:
    forward: Linear  # DiT: FLOPs
    decode: Linear  # VAE: pixels


class CostModel:
    """Estimates a resolved request's cost on one pipeline's model and device."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.calibration: Calibration | None = None

    def estimate(self, request: GenerationRequest, steps: int) -> Cost:
        """Cost of ``request`` (resolved: sizes filled in) run for ``steps`` steps."""
        parts = self.pipeline.parts
        cfg = parts.dit.cfg
        latent = parts.vae.latent_shape(request.frames, request.height, request.width)
        t, h, w = parts.dit.token_grid(latent)
        s = h * w
        tokens = t * s
        batch = guidance_rows(request.cfg_scale, self.pipeline.temporal_guidance)
        c, r, length = cfg.hidden_size, cfg.mlp_ratio, cfg.model_max_length
        per_token = (12 + 4 * r) * c * c + 2 * c * (s + t) + 4 * length * c
        macs = cfg.depth * (tokens * per_token + 4 * length * c * c)
        flops = 2.0 * macs * batch * steps
        pixels = request.frames * request.height * request.width
        itemsize = parts.dit.x_embedder.proj.weight.element_size()
        memory = (batch * tokens * c * (r + ACTIVATION_WIDTHS) * itemsize
                  + pixels * 3 * 4 * 2)  # the decoded video in float32, and its bytes
        seconds = None
        if self.calibration is not None:
            seconds = (self.calibration.forward.seconds(flops, steps)
                       + self.calibration.decode.seconds(pixels))
        return Cost(tokens, steps, flops, pixels, int(memory), seconds)

    @torch.inference_mode()
    def calibrate(self) -> Calibration:
        """Time one forward and one decode of the model's default request and of one with
        sides twice as long (each after a warm-up call) on the pipeline's device, and fit
        a call's overhead and throughput to each pair."""
        pipe = self.pipeline
        default = pipe.resolve(GenerationRequest("calibration"))
        # Twice the sides where the ceiling allows (else the same size: throughput only).
        scale = 2 if 2 * max(default.height, default.width) <= MAX_SIDE else 1
        big = pipe.resolve(dataclasses.replace(
            default, height=scale * default.height, width=scale * default.width))
        points = [self._time(req) for req in (default, big)]
        self.calibration = Calibration(
            Linear.fit(points[0][0], points[1][0]), Linear.fit(points[0][1], points[1][1]))
        log.info("device speed: %.3g TFLOP/s in the DiT (+%.1f ms a forward), %.3g s per "
                 "megapixel decoded", self.calibration.forward.rate / 1e12,
                 self.calibration.forward.fixed_s * 1e3, 1e6 / self.calibration.decode.rate)
        return self.calibration

    def _time(self, req: GenerationRequest) -> tuple[tuple[float, float], tuple[float, float]]:
        """((FLOPs, s) of one guided forward, (pixels, s) of one decode) for ``req``."""
        pipe = self.pipeline
        parts = pipe.parts
        z = pipe.initial_noise(req)
        text = parts.text_encoder.encode([req.prompt]).to(pipe.device)
        guidance = Guidance(parts.dit, text, req.cfg_scale, req.fps, req.height, req.width,
                            pipe.temporal_guidance)
        sync = torch.cuda.synchronize if pipe.device.type == "cuda" else (lambda: None)

        def timed(fn: Callable[[], object]) -> float:
            fn()  # warm-up: lazy initialisation, allocator growth, kernel selection
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            return max(time.perf_counter() - t0, 1e-6)

        cost = self.estimate(req, 1)
        return ((cost.flops, timed(lambda: guidance.velocity(z, 500.0))),
                (float(cost.pixels), timed(lambda: parts.vae.decode(z, req.frames))))


def auto_memory_ceiling(device: torch.device) -> int:
    """Bytes a request may take when the setting leaves it to the daemon (see
    AUTO_MEMORY_SHARE)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * AUTO_MEMORY_SHARE["cuda"])
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # not on this platform: no ceiling from memory
        return 2**62
    return int(available * AUTO_MEMORY_SHARE["cpu"])


class TooCostly(ChaidError):
    """A request whose estimated cost exceeds a ceiling; ``data`` has the figures."""

    def __init__(self, message: str, data: dict) -> None:
        super().__init__(message)
        self.data = data


class Admission:
    """Refuses requests whose estimated device time or memory exceeds the ceilings."""

    def __init__(self, cost: CostModel, max_seconds: float, max_bytes: int) -> None:
        self.cost = cost
        self.max_seconds = max_seconds
        self.max_bytes = max_bytes
        self.refused = 0

    @classmethod
    def from_settings(cls, cost: CostModel, max_request_s: float,
                      max_request_memory_mb: int) -> Admission:
        """``max_request_memory_mb`` 0: a share of the memory found now (auto_memory_ceiling)."""
        max_bytes = (max_request_memory_mb << 20 if max_request_memory_mb
                     else auto_memory_ceiling(cost.pipeline.device))
        return cls(cost, max_request_s, max_bytes)

    def check(self, request: GenerationRequest, steps: int) -> Cost:
        """The cost of ``request`` run for ``steps`` steps; TooCostly over a ceiling."""
        cost = self.cost.estimate(request, steps)
        data = {**cost.as_dict(), "max_s": self.max_seconds,
                "max_memory_mb": round(self.max_bytes / 2**20, 1)}
        size = (f"{request.frames} frames of {request.width}x{request.height} for {steps} "
                f"steps")
        if cost.memory_bytes > self.max_bytes:
            self.refused += 1
            raise TooCostly(f"{size} needs about {cost.memory_bytes / 2**20:,.0f} MB of device "
                            f"memory; the limit is {self.max_bytes / 2**20:,.0f} MB "
                            f"(server.max_request_memory_mb)", data)
        if cost.seconds is not None and cost.seconds > self.max_seconds:
            self.refused += 1
            raise TooCostly(f"{size} would take about {cost.seconds:,.0f} s of the device; "
                            f"the limit is {self.max_seconds:g} s (server.max_request_s); "
                            f"ask for fewer frames, smaller sides or fewer steps", data)
        return cost

    def as_dict(self) -> dict:
        cal = self.cost.calibration
        return {"max_request_s": self.max_seconds,
                "max_request_memory_mb": round(self.max_bytes / 2**20, 1),
                "refused": self.refused,
                "dit_tflops_per_s": None if cal is None else round(cal.forward.rate / 1e12, 4),
                "decode_mpixels_per_s": None if cal is None else round(cal.decode.rate / 1e6, 3)}
