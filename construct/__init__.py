"""ConStruct: structural distillation of foundation models for prototype-based WSSS."""

__version__ = "0.1.0"
