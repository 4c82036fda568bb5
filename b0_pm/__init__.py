"""b0-process-manager: BlueZero's Process Manager and HUB on systemd."""

__version__ = "0.1.0"
