"""``remoterun ui``: a run browser in a web page, served from this machine.

``server.serve`` starts it; ``browse`` answers what the page asks (no web code there);
``app`` is the web app; ``static/`` holds the page, its script and the vendored uPlot
(MIT, from npm's ``uplot``), so nothing is fetched at run time. Imported by the command
only: ``import remoterun`` never loads it.
"""
