"""The gateway to Redis: one typed method per Lua script (gateway.py), every key name (keys.py),
the typed messages they exchange (records.py), and the transport that runs scripts (transport.py).

Nothing here imports the API or the worker; both talk to Redis only through :class:`Gateway`.
"""
from .gateway import Gateway
from .keys import Keys
from .records import (NO_CONTROLS, Ack, Controls, DueSchedule, DueSchedules, Failure, FetchReply, Leased, Outcomes,
                      Overdue, Recovered, Release, TickResult, Unreadable)
from .transport import InFlight, Transport, connect

__all__ = ["NO_CONTROLS", "Ack", "Controls", "DueSchedule", "DueSchedules", "Failure", "FetchReply", "Gateway",
           "InFlight", "Keys", "Leased", "Outcomes", "Overdue", "Recovered", "Release", "TickResult", "Transport", "Unreadable", "connect"]
