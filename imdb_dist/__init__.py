"""imdb-dist: distributed multi-GPU training of an IMDB sentiment CNN-LSTM."""

__version__ = "0.1.0"
