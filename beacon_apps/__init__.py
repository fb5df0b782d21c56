"""beacon-apps: whole documents in front of a local LLM, through Activation Beacon."""

__version__ = "0.1.0"
