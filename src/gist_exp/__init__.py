"""gist_exp: GIST with Adapter, LoRA and VPT on timm Vision Transformers, for VTAB-1K."""

__version__ = "0.1.0"
