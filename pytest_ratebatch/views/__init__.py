"""What the limits do, for people: the forecast, the progress line, the timeline picture.

Pure logic on plain numbers and the JSON report; nothing here imports pytest. The plugin
imports ``forecast`` and ``progress`` only when a policy is in force; the command line
(``python -m pytest_ratebatch``) the rest.
"""

from __future__ import annotations

__all__: list[str] = []
