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


# set by `minpro sweep` for its runs: a run stops (SIGTERM) when its sweep dies, even by SIGKILL
DIE_WITH_PARENT = "MINPRO_DIE_WITH_PARENT"


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (a scheduler's preemption, a closed terminal), raised in the main thread
    so that everything Ctrl-C cleans up is cleaned up alike; the CLI exits 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__()
        self.signum = signum


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or a `Terminated` signal), with what was saved and how to resume: the CLI prints
    it on one line, exit 130 (128 + signum for another signal)."""

    def __init__(self, message: str, signum: int | None = None) -> None:
        super().__init__(message)
        self.signum = signum
