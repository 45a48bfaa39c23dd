"""What the limits did and will do, for people and tools: records and the JSON report
(``report``), the forecast, the progress line, the timeline picture, reports read back,
files written whole or not at all (``output``), the calls to limited hosts (``calls``) and
their forecast from the last run (``call_forecast``).

Pure logic on plain numbers and the JSON report: nothing here imports pytest (``terminal``
writes through pytest's terminal reporter, which it is handed). The plugin imports
``forecast``, ``progress`` and ``terminal`` only when a policy is in force, ``timeline``
only to draw one; the command line (``python -m pytest_ratebatch``) ``loading`` and
``timeline``.

Imports: ``limits`` only.
"""
