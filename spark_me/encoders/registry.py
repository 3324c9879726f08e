"""Name -> sparse-encoder factory, so encoders (the library's and users') plug in by name."""
from __future__ import annotations

from typing import Callable

from spark_me.encoders.base import SparseEncoder
from spark_me.layers import set_conv_impl

EncoderFactory = Callable[..., SparseEncoder]


class EncoderRegistry:
    """A mapping of encoder names to factories. The library keeps one default instance."""

    def __init__(self) -> None:
        self._factories: dict[str, EncoderFactory] = {}

    def register(self, name: str, factory: EncoderFactory, overwrite: bool = False) -> EncoderFactory:
        if name in self._factories and not overwrite:
            raise ValueError(f"a sparse encoder named '{name}' is already registered; pass overwrite=True")
        self._factories[name] = factory
        return factory

    def names(self) -> list[str]:
        return sorted(self._factories)

    def build(self, name: str, conv_impl: str = "auto", **kwargs) -> SparseEncoder:
        """The encoder ``name`` from its factory's ``kwargs``, its sparse convs and pools on
        backend ``conv_impl`` (see :data:`spark_me.ops.CONV_IMPLS`)."""
        if name not in self._factories:
            raise ValueError(
                f"unknown sparse encoder '{name}'; supported: {', '.join(self.names())}. "
                "Register your own with spark_me.register_encoder(name, factory)."
            )
        return set_conv_impl(self._factories[name](**kwargs), conv_impl)


ENCODERS = EncoderRegistry()


def register_encoder(name: str, factory: EncoderFactory | None = None, overwrite: bool = False):
    """Register ``factory`` (a class or function returning a SparseEncoder) under ``name``.

    Usable as a call or as a decorator: ``@register_encoder("my_net")``.
    """
    if factory is None:
        return lambda f: ENCODERS.register(name, f, overwrite)
    return ENCODERS.register(name, factory, overwrite)


def build_sparse_encoder(name: str, conv_impl: str = "auto", **kwargs) -> SparseEncoder:
    """Build a registered sparse encoder by its timm model name (e.g. ``'resnet50'``).

    ``conv_impl`` picks the backend of its sparse convs and pools: ``"auto"`` (default),
    ``"torch"`` (gathers and GEMMs, any dtype) or ``"minkowski"`` (MinkowskiEngine's
    kernels, the reference); ``kwargs`` go to the encoder's factory.
    """
    return ENCODERS.build(name, conv_impl=conv_impl, **kwargs)


def list_encoders() -> list[str]:
    """Names accepted by :func:`build_sparse_encoder`."""
    return ENCODERS.names()
