"""Reports on what the passes did, run only when someone asks: the explain table and its JSON
(``explain``), before/after dumps, drawings and the dump page (``dump``, ``page``), copies and
kernels (``accounting``), and where a site is in the user's code (``source``).

Submodules are imported by name (``attnopt.report.explain``): the passes use ``accounting`` and
``source`` while ``explain`` builds on the passes.
"""
