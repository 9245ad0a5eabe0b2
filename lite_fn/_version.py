"""The package version (one place: lite_fn/__init__ re-exports it; writers record it in files)."""

__version__ = "0.1.0"
