"""Fine-tuning a patched model: parameter groups, freezing, gate values, and the
``attn-inject finetune`` training run (one process or torchrun DDP)."""

from .freeze import freeze_base, head_names
from .gates import blends, gates, mean_gate
from .groups import param_groups

__all__ = ["blends", "freeze_base", "gates", "head_names", "mean_gate", "param_groups"]
