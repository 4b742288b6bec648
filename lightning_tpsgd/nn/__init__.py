"""Layers with their own local learning rule."""

from .base import LocalContext, LocalModule
from .rnn import RNN

__all__ = ["RNN", "LocalContext", "LocalModule"]
