"""Calibration: thresholds per (CFG branch, denoising step, layer) from a quality budget, and the
profile files that hold them."""

from .profile import Budget, Profile, ProfileError, load_profile
from .search import DEFAULT_GRID, calibrate

__all__ = ["DEFAULT_GRID", "Budget", "Profile", "ProfileError", "calibrate", "load_profile"]
