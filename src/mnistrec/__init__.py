"""mnistrec: handwritten-digit recognition with PyTorch, from the classic MNIST recipe to your own images."""

__version__ = "0.1.0"
