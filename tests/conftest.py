"""Settings shared by the whole suite: the hypothesis profiles.

``ci`` (the default) is derandomized, so that a run is repeatable and a failure
seen once is seen again, and keeps no example database (no ``.hypothesis/``
directory in the tree). ``HYPOTHESIS_PROFILE=explore`` runs the property and
fuzz tests with random seeds and ten times the examples, for a search by hand.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", max_examples=2000, database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
