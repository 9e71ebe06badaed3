"""What every rollout actor does in the weight-sync group (``rollout.weight_sync: direct``): join it
as group rank 1 + replica, and receive each policy version that trainer rank 0 broadcasts.

    class MyRolloutActor(SyncGroupMember):
        def _receive(self, link, version): ...    # take the weights in; the mixin sets the version
"""

from __future__ import annotations

from mopd.weight_sync import WeightLink


class SyncGroupMember:
    """Mixin for a rollout actor with a ``_version`` attribute and a ``_receive(link, version)``."""

    _link: WeightLink | None = None
    _version: int

    def join_weight_sync(self, host: str, port: int, generation: int, rank: int, world: int, backend: str) -> None:
        """Join the weight-sync group's ``generation`` as ``rank`` (blocks until every member has joined)."""
        self._link = None  # the previous generation's group, if any
        self._link = WeightLink(host, port, generation, rank, world, backend)

    def receive_weights(self, version: int) -> int:
        """Receive policy ``version`` from trainer rank 0; returns the version. Outside a group (a
        restarted replica, which the pool gave the weights through the driver) a no-op if this
        replica already has that version."""
        version = int(version)
        if self._link is None:
            if self._version == version:
                return version
            raise RuntimeError("receive_weights before join_weight_sync: this replica is in no weight-sync group")
        try:
            self._receive(self._link, version)
        except BaseException:
            self._link = None  # a broken group: closing it frees the other members' waits
            raise
        self._version = version
        return version

    def _receive(self, link: WeightLink, version: int) -> None:
        raise NotImplementedError

    def leave_weight_sync(self) -> None:
        self._link = None
