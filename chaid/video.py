"""MP4 encoding with PyAV (FFmpeg inside the wheel; no system ffmpeg needed).

Videos are uint8 arrays (frames, height, width, 3) in RGB. H.264 with 4:2:0 chroma needs
even sides, so an odd side is padded by repeating the last row or column; the reader gives
back what the file holds.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import av
import numpy as np

from chaid.errors import ChaidError

# Constant rate factor: 18 is visually near-lossless for H.264 at a modest size.
H264_CRF = "18"


def encode_mp4(video: np.ndarray, fps: int) -> bytes:
    """Encode (F, H, W, 3) uint8 RGB frames as an H.264 MP4, returned as bytes."""
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3 or video.shape[0] < 1:
        raise ChaidError(f"expected uint8 frames (F, H, W, 3), got {video.dtype} {video.shape}")
    pad_h, pad_w = video.shape[1] % 2, video.shape[2] % 2
    if pad_h or pad_w:
        video = np.pad(video, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=int(fps))
        stream.width, stream.height = video.shape[2], video.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": H264_CRF, "preset": "medium"}
        for frame in video:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def write_mp4(path: str | Path, video: np.ndarray, fps: int) -> Path:
    """Encode and write atomically: the file appears whole or not at all."""
    path = Path(path)
    data = encode_mp4(video, fps)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        raise ChaidError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def read_video(source: str | Path | bytes) -> tuple[np.ndarray, float]:
    """Decode a video file (or its bytes) → ((F, H, W, 3) uint8 RGB, frames per second)."""
    src = io.BytesIO(source) if isinstance(source, bytes | bytearray) else str(source)
    try:
        with av.open(src) as container:
            stream = container.streams.video[0]
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
            fps = float(stream.average_rate or 0)
    except av.FFmpegError as exc:
        raise ChaidError(f"cannot decode video: {exc}") from None
    if not frames:
        raise ChaidError("video has no frames")
    return np.stack(frames), fps
