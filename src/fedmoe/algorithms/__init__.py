"""fedmoe.algorithms — one file per method, each in a server half and a client half that meet only
through messages (:mod:`fedmoe.algorithms.base`); the registry lists them."""

from .base import Client, Method, ModelSpec, Objective, Server, State, model_spec, weighted_average
from .registry import METHODS, get_method
from .server_opt import server_update

__all__ = ["METHODS", "Client", "Method", "ModelSpec", "Objective", "Server", "State", "get_method", "model_spec",
           "server_update", "weighted_average"]
