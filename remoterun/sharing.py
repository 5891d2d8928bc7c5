"""Team-shared stores: where a function looks on a cache miss, and publishes its runs.

A function's ``share=`` stores come first, then its system's. A run found there is taken
only if it is COMPLETED, of the same function (``fn_qualname``) and fingerprint, and, by
default, signed under the team key (``share_trust="signed"``); ``"writers"`` trusts
whoever can write to the store (digests are still checked).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from . import fingerprint, registry
from .agent import integrity
from .agent.record import COMPLETED
from .errors import RemoterunError, RunExistsError, SigningKeyError
from .run import Run

# A System (``remoterun.systems``): the layer above.
System = Any

logger = logging.getLogger("remoterun.function")

#: The action of a reply made here, not by a host: a hit in a shared store.
SHARED = "shared"
TRUSTS = ("signed", "writers")
#: Sets ``share_trust`` for every function that does not set it itself.
SHARE_TRUST_ENV = "REMOTERUN_SHARE_TRUST"


class SharedStores:
    """The shared stores of one function on one system."""

    def __init__(self, share: tuple, system: Any, share_trust: str | None):
        self.pairs: dict[str, dict] = dict(share)
        for url, options in getattr(system, "share", ()):
            self.pairs.setdefault(url, options)
        self._trust = share_trust

    def __bool__(self) -> bool:
        return bool(self.pairs)

    def stores(self) -> list[System]:
        if not self.pairs:
            return []
        store = registry.load("storage")
        return [store(url, **options) for url, options in self.pairs.items()]

    def trust(self) -> str:
        """How runs from the shared stores are trusted: ``"signed"`` (they must carry a
        valid signature under the team key, which must exist) or ``"writers"``
        (whoever can write to the store is trusted; digests are still checked)."""
        trust = self._trust or os.environ.get(SHARE_TRUST_ENV) or "signed"
        if trust not in TRUSTS:
            raise ValueError(f"share_trust must be one of {TRUSTS}, not {trust!r}")
        if trust == "signed" and integrity.signing_key() is None:
            stores = ", ".join(self.pairs)
            raise SigningKeyError(
                f"share= needs your team's signing key, so that a run taken from {stores} "
                "is known to come from your team and not from anyone else who can write "
                "there: run `remoterun keygen` and give the key file it writes to your "
                f"team, or set {integrity.KEY_ENV} to the same secret everywhere. To trust "
                "everyone who can write to the store instead, pass share_trust='writers' "
                f"(or set {SHARE_TRUST_ENV}=writers)."
            )
        return trust

    def hit(self, request: dict, qualname: str, on_mismatch: str) -> dict | None:
        """A COMPLETED run of the request's name and fingerprint in a shared store, as a
        reply with ``action="shared"``; None when no store has one."""
        if not self.pairs:
            return None
        name = request["name"]
        trust = self.trust()
        for store in self.stores():
            url = store.url
            folder = store.folder(name)
            reply = store.status(name, want_outcome=True)
            config = reply.get("config")
            if not config or config.status != COMPLETED:
                continue
            if config.fn_qualname != qualname:
                logger.info(
                    "%s holds %s made by %s, not %s: not used",
                    url,
                    name,
                    config.fn_qualname or "an unknown function",
                    qualname,
                )
                continue
            differences = fingerprint.fingerprint_differences(config, request)
            if differences and on_mismatch != "ignore":
                logger.info(
                    "%s holds %s made from other arguments (%s): not used",
                    url,
                    name,
                    ", ".join(differences),
                )
                continue
            # Never taken (nor unpickled) unless signed under the team key.
            folder.check_trusted(config, required=trust == "signed")
            logger.debug("cache hit for %s in the shared store %s", name, url)
            return {
                "action": SHARED,
                "name": name,
                "config": config,
                "result": reply.get("result"),
                "run": Run(folder, store, config, trust=trust),
            }
        return None

    def publish(self, run: Run) -> None:
        """Copy a run the function executed to the shared stores. A store that already
        holds another run of the name (a teammate was first) keeps it."""
        for store in self.stores():
            try:
                run.to(store)  # into <url>/<name>, with the store's storage options
            except RunExistsError:
                logger.info("%s already holds a run named %s: kept", store.url, run.name)
            except RemoterunError as exc:
                logger.warning("could not publish run %s to %s: %s", run.name, store.url, exc)
