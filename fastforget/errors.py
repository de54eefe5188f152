"""Typed errors. Each names the offending input so the caller can fix it without a debugger."""


class FastForgetError(Exception):
    """Base class of every error fastforget raises on purpose."""


class InputError(FastForgetError, ValueError):
    """An argument has the wrong type, shape, size or values."""


class EmbeddingError(InputError):
    """An identity embedding is the wrong size, not finite, or zero."""


class NoFaceError(InputError):
    """No face was found in an image."""


class ConflictError(InputError):
    """A request contradicts itself (a target also retained, an anchor equal to its target)."""


class ModelLoadError(FastForgetError, OSError):
    """A model folder or checkpoint is missing, corrupt, or of an unknown layout."""


class UnsafeCheckpointError(ModelLoadError):
    """A checkpoint would execute code when loaded and the caller did not opt in."""


class OutputExistsError(FastForgetError, FileExistsError):
    """The output path exists and overwrite=True was not given."""


class UnknownMethodError(InputError, KeyError):
    """No erasure method is registered under that name."""

    def __str__(self):  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class FitError(FastForgetError, RuntimeError):
    """An erasure method produced an unusable result (non-finite weights); nothing was applied."""


class OutputPathError(FastForgetError, OSError):
    """An output path cannot be written: its parent cannot be created or written, it is a folder
    where a file is expected (or the reverse), or replacing it would delete something it must not."""


class PatchMismatchError(InputError):
    """A patch does not fit the model it is applied to or reverted on (names the first tensor that differs)."""
