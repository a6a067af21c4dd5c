"""Saving and loading: safetensors files with their manifest, checkpoints, hub folders, and
the bridges to timm's scripts and Hugging Face transformers."""

from .file import load, read_manifest, save

__all__ = ["load", "read_manifest", "save"]
