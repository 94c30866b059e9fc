"""Errors a user can fix. Each message says what was expected and how to fix it.

They subclass ValueError so that ComfyUI reports them on the node instead of as an internal failure.
"""


class PackError(ValueError):
    """Base class of every user-facing error of this pack."""


class MissingDependencyError(PackError, ImportError):
    """An optional library is not installed; the message names the install command."""


class ModelFolderError(PackError):
    """A model folder is missing or laid out wrongly; the message names the exact path expected."""


class ModelFileError(PackError):
    """A weights file is corrupt, of another format, or for another model family."""


class ImageInputError(PackError):
    """An IMAGE input that cannot be processed (empty, wrong channels, NaN, too small)."""


class NoFaceError(PackError):
    """No usable face in an image while the policy is to stop with an error."""


class ConfigError(PackError):
    """A setting a user can fix: a trainer option, a node's text field (the message names it and what is expected)."""


class DatasetError(PackError):
    """A training dataset that cannot be used as it is (missing folder, no usable identity)."""
