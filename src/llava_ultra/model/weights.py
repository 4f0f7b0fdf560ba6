"""Reading weight files with errors that say what is wrong with the file and how to fix it.

What this file owns: `read_safetensors_file`, the one place a .safetensors file is opened when a
checkpoint (ours, or a foreign one being converted) is loaded, so that a truncated download or a
damaged copy is a `CheckpointError` naming the file and its size instead of a Rust traceback.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import CheckpointError


def read_safetensors_file(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of one .safetensors file; a missing, truncated or damaged file raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} is missing; copy the complete checkpoint folder again")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises SafetensorError (bad header, truncation) or OSError
        raise CheckpointError(
            f"{path} ({path.stat().st_size} bytes) is damaged or truncated and cannot be read as "
            f"safetensors ({exc}); re-download or re-copy that file (an interrupted download or copy "
            "leaves it short)"
        ) from None
