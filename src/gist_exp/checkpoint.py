"""Checkpoint files: written atomically, read with weights_only=True (no arbitrary unpickling)."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from .errors import CheckpointError
from .io import atomic_write_bytes


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(path, buffer.getvalue())

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        path = Path(path)
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(
                f"checkpoint '{path}' cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
                f"Move it away to start this run over: mv '{path}' '{path}.bad'") from None
