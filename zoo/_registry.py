"""Model registry for the zoo, modelled on ``timm.models._registry``.

A model *entrypoint* is a function that takes keyword arguments and returns an ``nn.Module``.
``@register_model`` keys it by its ``__name__`` (the short architecture name users type in a recipe, e.g.
``"cnn2"``), and :func:`create_model` is the single public way to build one by name.

Example:
    >>> from zoo import create_model, list_models
    >>> list_models("cnn*")
    ['cnn2']
    >>> net = create_model("cnn2", num_classes=10, filters=None)  # None means "use the default"
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import sys
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

__all__ = ["create_model", "is_model", "list_models", "register_model"]

_Entrypoint = TypeVar("_Entrypoint", bound=Callable[..., nn.Module])

_model_entrypoints: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: _Entrypoint) -> _Entrypoint:
    """Register a model entrypoint under its function name and add it to its module's ``__all__``.

    Registering a second function with the same name from a *different* module replaces the first and
    warns; re-registering from the same module (e.g. after ``importlib.reload``) replaces it silently.

    Args:
        fn: A function returning an ``nn.Module``. Its ``__name__`` becomes the registry key.

    Returns:
        ``fn`` unchanged, so the decorator can be stacked.
    """
    name = fn.__name__
    previous = _model_entrypoints.get(name)
    if previous is not None and previous.__module__ != fn.__module__:
        warnings.warn(
            f"Model {name!r} from {previous.__module__} is overwritten by {fn.__module__}.{name}. "
            "Rename one of the entrypoints to keep both.",
            UserWarning,
            stacklevel=2,
        )
    module = sys.modules.get(fn.__module__)
    if module is not None:
        exported = module.__dict__.setdefault("__all__", [])
        if name not in exported:
            exported.append(name)
    _model_entrypoints[name] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Return the sorted names of registered models that match a shell-style ``pattern``.

    Args:
        pattern: An ``fnmatch`` pattern, e.g. ``"cnn*"`` or ``"*grid"``.

    Returns:
        Sorted list of matching model names (empty if none match).
    """
    return sorted(name for name in _model_entrypoints if fnmatch.fnmatchcase(name, pattern))


def is_model(name: str) -> bool:
    """Return ``True`` if ``name`` is a registered model."""
    return name in _model_entrypoints


def _model_entrypoint(name: str) -> Callable[..., nn.Module]:
    try:
        return _model_entrypoints[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_model_entrypoints), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"Unknown model {name!r}.{hint} Valid names: {', '.join(list_models())}. "
            "Register a new one with @zoo.register_model."
        ) from None


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model by name.

    Keyword arguments whose value is ``None`` are dropped before the entrypoint is called, so a config
    file can leave an option unset and get the entrypoint's default (as ``timm.create_model`` does).

    Args:
        name: A registered model name; see :func:`list_models`.
        **kwargs: Forwarded to the entrypoint, e.g. ``num_classes``, ``in_chans``, ``input_size``.

    Returns:
        The freshly initialised model.

    Raises:
        ValueError: If ``name`` is not registered (the message lists the valid names).
        TypeError: If ``kwargs`` do not match the entrypoint's signature (the message lists its arguments).
    """
    fn = _model_entrypoint(name)
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    signature = inspect.signature(fn)
    try:
        signature.bind(**kwargs)
    except TypeError as err:
        accepted = ", ".join(signature.parameters)
        raise TypeError(f"Invalid arguments for model {name!r}: {err}. {name} accepts: {accepted}.") from err
    return fn(**kwargs)
