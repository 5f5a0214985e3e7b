"""Cluster mode: what N processes share through one Redis (no tornado imports here).

- ``rate_limit``: the exact sliding-window limiter, one Lua script call per message;
- ``locks``: the busy lock per session with its fencing number, and the ``msg:<id>``
  pointer to the node generating an answer;
- ``control``: one pub/sub channel per node, for stop and follow requests and for
  relaying an answer's deltas to a node whose client follows it.
"""
