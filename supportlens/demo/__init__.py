"""``supportlens demo``: the main job, a past day replayed through the real pipeline (see :mod:`supportlens.demo.main`)."""

from supportlens.demo.main import library_logs_to, run_demo

__all__ = ["library_logs_to", "run_demo"]
