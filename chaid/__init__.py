"""chaid: a caching sidecar daemon for text-to-video diffusion (CHAI)."""

__version__ = "0.1.0"
