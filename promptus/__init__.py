"""Promptus: video compressed into prompts for SD-Turbo."""

__version__ = "0.1.0"
