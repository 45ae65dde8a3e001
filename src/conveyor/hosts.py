"""Hosts: the machines the SSH executor runs commands on, as declared in `[hosts.NAME]`,
and the pure choice of one with a free slot."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Host:
    name: str
    address: str
    user: str
    port: int = 22
    key_file: str | None = None  # private key; None: the SSH agent / default keys
    # Host keys to trust. Strict checking is the default: a host whose key is not in
    # this file (or differs from it) is refused before anything runs.
    known_hosts: str | None = None
    # Turns host-key checking off (a man-in-the-middle could then read every command
    # and answer). Logged as a warning on every connection.
    insecure_skip_host_key_check: bool = False
    concurrency: int = 1  # most tasks at once on this host, per worker process
    connect_timeout: float = 10.0
    keepalive_interval: float = 15.0  # seconds between keepalives on an idle connection
    keepalive_count_max: int = 3  # unanswered keepalives before the host counts as lost
    # This host's names for paths the pipeline has already mapped (e.g. the worker's
    # /mnt/p/ is /data/p/ there): applied to the declared path fields before the
    # command is rendered, and back in the result.
    path_map: tuple[tuple[str, str], ...] = ()


def pick_host(hosts: Sequence[Host], busy: Mapping[str, int], start: int = 0) -> Host | None:
    """The least loaded host (by share of its slots in use) that has a free slot,
    trying from `start` so that ties rotate; None when every host is full."""
    best: Host | None = None
    best_load = 1.0
    n = len(hosts)
    for i in range(n):
        host = hosts[(start + i) % n]
        used = busy.get(host.name, 0)
        if used >= host.concurrency:
            continue
        load = used / host.concurrency
        if best is None or load < best_load:
            best, best_load = host, load
    return best
