"""cosyvoiced: a systemd-supervised text-to-speech daemon."""

__version__ = "0.1.0"
