"""The persistent latent cache: LMDB store, entity extractor and embedder, Annoy index,
eviction policies and lookup.

This package's ``__init__`` stays import-light (no lmdb, spaCy or torch) so the command line
can register the ``cache`` and ``bench`` commands cheaply. Import the pieces from their
modules: :mod:`chaid.store.cache` (the facade), :mod:`chaid.store.analysis` (entities and
embeddings), :mod:`chaid.store.settings`.
"""
