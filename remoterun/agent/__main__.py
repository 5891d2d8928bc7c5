"""``python -m remoterun.agent``: the agent (see ``server.py``)."""

from .server import main

if __name__ == "__main__":
    main()
