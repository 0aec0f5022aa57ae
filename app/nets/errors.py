"""The one error type of `app.nets` (kept apart so that `unet.py` and `checkpoint.py` both raise it)."""


class CheckpointError(ValueError):
    """A checkpoint, weights file or config that cannot be used; the message names the problem and path."""
