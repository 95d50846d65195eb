"""The engine: the generation pipeline and the rectified-flow sampler it drives."""
