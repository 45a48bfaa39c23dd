"""The pytest glue: hooks, options, the session's wiring, the pacers, the xdist side, the
fixture and the reporter on pytest's terminal.

``hooks`` and ``options`` load on every pytest run (from bytecode: see
``pytest_ratebatch_entry``) and nothing more unless an option is set; then ``session`` wires
what this process needs: ``pacing`` where tests run, ``reporter`` where outcomes are
reported, ``xdist`` and ``session_dir`` under pytest-xdist, ``registry`` to register the
parts' hooks cheaply, ``fixture`` for ``ratebatch.acquire()`` in a test.

Imports: every other subpackage; none imports this one.
"""
