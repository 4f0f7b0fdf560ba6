"""Project-wide exception types.

Every error raised at a boundary (bad file, bad config, bad request) is a `LlavaUltraError`
subclass whose message names the offending item and the fix. The CLI prints these without a
traceback and exits with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class LlavaUltraError(Exception):
    """Base class: a user-facing error with a message that names the problem and the fix."""


class DataError(LlavaUltraError):
    """A dataset, report, image or DICOM file is missing, malformed or unsupported."""


class ConfigError(LlavaUltraError):
    """A configuration value or key is invalid."""


class CheckpointError(LlavaUltraError):
    """A checkpoint folder is missing files, has unexpected keys, or does not match its config."""
