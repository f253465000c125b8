"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class MinproError(Exception):
    """An error caused by the user's input (config, files, checkpoints), not a bug.

    The message must name the culprit (key, file, row) and say what to do.
    """


class ConfigError(MinproError):
    pass


class RolloutFileError(MinproError):
    pass


class CheckpointError(MinproError):
    pass


class PluginError(MinproError):
    pass


class TrainingDivergedError(MinproError):
    pass


class RunDirError(MinproError):
    pass


class InputFileError(MinproError):
    """A file a stage reads (task file, metrics, results) is not what it should be."""


class DiskFullError(MinproError):
    pass


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with what was saved and how to resume: the CLI prints it on one line, exit 130."""
