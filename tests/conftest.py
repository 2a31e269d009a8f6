"""Load the Hypothesis profile named by HYPOTHESIS_PROFILE (default: fast)."""

import os

from hypothesis import settings

from tests import strategies  # noqa: F401  (registers the profiles)

settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))
