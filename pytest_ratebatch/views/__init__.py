"""What the limits do, for people: the forecast, the progress line, the timeline picture.

Pure logic on plain numbers and the JSON report: nothing here imports pytest (``terminal``
writes through pytest's terminal reporter, which it is handed). The plugin imports
``forecast``, ``progress`` and ``terminal`` only when a policy is in force, ``timeline``
only to draw one; the command line (``python -m pytest_ratebatch``) ``loading`` and
``timeline``.
"""

from __future__ import annotations

__all__: list[str] = []
