"""The coordinator of a swarm, in rooms: see coordinator.py for the map."""

from .coordinator import Coordinator
from .peers import RouteHop

__all__ = ["Coordinator", "RouteHop"]
