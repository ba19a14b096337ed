"""lab: a small, fast, hackable laboratory for GPT-style language models.

Plugins import `hookimpl` from here and implement the hooks in `lab.hookspecs`.
"""

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("lab")
