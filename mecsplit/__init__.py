"""mecsplit: foundation models split into layer segments across emulated MEC edge nodes."""

__version__ = "0.1.0"
