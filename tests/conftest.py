"""Suite-wide test settings: one torch thread (tiny models are slower with more on a busy 2-core box)."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# pretrained-encoder cache (recipes/encoders.py): one fresh folder per test session, never ~/.cache
os.environ.setdefault("LLAVA_ULTRA_CACHE", tempfile.mkdtemp(prefix="llava-ultra-test-cache-"))

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover - torch is a hard dependency
    pass
