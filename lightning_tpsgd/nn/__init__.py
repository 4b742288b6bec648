"""Layers with their own local learning rule."""

from .base import LocalContext, LocalModule

__all__ = ["LocalContext", "LocalModule"]
