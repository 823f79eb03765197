"""Model adapters: one small file per diffusers DiT class."""

from __future__ import annotations

from qdit.errors import UnsupportedFormatError
from qdit.models import flux, qwen_image, z_image
from qdit.models.base import ModelAdapter

ADAPTERS: tuple[ModelAdapter, ...] = (qwen_image.ADAPTER, flux.ADAPTER, z_image.ADAPTER)


def adapter_by_name(name: str) -> ModelAdapter:
    for a in ADAPTERS:
        if a.name == name:
            return a
    raise UnsupportedFormatError(
        f"unknown model {name!r}", expected=", ".join(a.name for a in ADAPTERS), found=name)


def adapter_for_class(class_name: str | None, *, source: str) -> ModelAdapter:
    for a in ADAPTERS:
        if a.class_name == class_name:
            return a
    raise UnsupportedFormatError(
        "the checkpoint's transformer class is not one qdit serves",
        file=source, expected=", ".join(a.class_name for a in ADAPTERS), found=str(class_name),
        hint="qdit runs the diffusers DiT classes listed; adding one is a new file in qdit/models/.")
