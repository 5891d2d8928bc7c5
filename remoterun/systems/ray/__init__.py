"""Ray clusters as remoterun systems (the ``ray`` extra): see ``system.py``."""

from .system import RaySystem, ray

__all__ = ["RaySystem", "ray"]
