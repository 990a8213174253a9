"""Project exceptions: each carries a message a user can act on."""


class EdgevisionError(Exception):
    """A lasting failure with a message a user can act on (printed or spoken, never a traceback)."""

    exit_status = 2  # the unit's RestartPreventExitStatus: restarting will not fix it


class ConfigError(EdgevisionError):
    """The configuration file is malformed, has unknown keys or values out of range."""


class ModelError(EdgevisionError):
    """A model file is missing, corrupt, or of the wrong kind."""


class InputError(EdgevisionError):
    """An input (image, audio) cannot be read."""


class MissingDependencyError(EdgevisionError):
    """A native library needed by the chosen back-end is not installed."""


class DeviceError(EdgevisionError):
    """A camera, microphone, speaker or button failed or is missing."""


class DeviceMissing(DeviceError):
    """A device did not appear while start-up waited for it; it may yet (a USB microphone plugged in late)."""

    exit_status = 3  # not in RestartPreventExitStatus: systemd starts the service again
