"""The errors a user can cause and fix, in one place, so the entry point has one boundary.

Every one of them carries a message that names the key, file or row and says how to fix it;
``alignment.run`` prints it as one line (``alignment: error: ...``), without a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A failure the user can fix from the message alone (config, data, disk, checkpoints)."""


class ConfigError(UserError, ValueError):
    """A config the run cannot use; the message names the key and the recipe."""


class StageError(ConfigError):
    """A stage cannot run as configured; the message says which key or file to fix."""


class DataError(UserError, ValueError):
    """Bad or missing data; the message names the file and row and says how to fix it."""


class CheckpointError(UserError, ValueError):
    """A requested checkpoint cannot be resumed; the message says why and what to do."""


class NonFiniteLoss(UserError, RuntimeError):
    """The loss or a gradient became NaN or infinite; the message names the stage and step."""
