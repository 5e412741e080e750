"""MoE Workbench: design, build, chat with and inspect frankenMoE merges."""

__version__ = "0.1.0"
