import numpy as np
import pytest

from chaid.errors import ChaidError
from chaid.video import encode_mp4, read_video, write_mp4


def _moving_square(frames=6, h=32, w=48):
    video = np.zeros((frames, h, w, 3), np.uint8)
    for f in range(frames):
        video[f, 8:20, 4 + 4 * f : 16 + 4 * f] = (220, 40, 40)
    return video


def test_round_trip_keeps_frames_size_and_content(tmp_path):
    video = _moving_square()
    path = write_mp4(tmp_path / "sub" / "v.mp4", video, fps=8)
    back, fps = read_video(path)
    assert back.shape == video.shape and fps == 8
    assert np.abs(back.astype(int) - video.astype(int)).mean() < 6
    assert read_video(encode_mp4(video, 8))[0].shape == video.shape


def test_odd_sides_are_padded_to_even():
    back, _ = read_video(encode_mp4(_moving_square(h=31, w=45), 8))
    assert back.shape == (6, 32, 46, 3)


def test_bad_frames_and_bad_files(tmp_path):
    with pytest.raises(ChaidError):
        encode_mp4(np.zeros((2, 8, 8), np.uint8), 8)
    with pytest.raises(ChaidError):
        encode_mp4(np.zeros((2, 8, 8, 3), np.float32), 8)
    with pytest.raises(ChaidError):
        read_video(b"not a video at all")
    (tmp_path / "dir.mp4").mkdir()
    with pytest.raises(ChaidError, match="cannot write"):
        write_mp4(tmp_path / "dir.mp4", _moving_square(), 8)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
