"""What every rollout actor does in the weight-sync group (``rollout.weight_sync: direct``): join it
as group rank 1 + replica, and receive each policy version that trainer rank 0 broadcasts.

    class MyRolloutActor(SyncGroupMember):
        def _receive(self, version): ...          # take the weights in from self._link
        # optional: _join / _leave, to hold the group's end elsewhere (the vLLM GPU worker)
"""

from __future__ import annotations

from mopd.dist.weight_sync import WeightLink


class SyncGroupMember:
    """Mixin for a rollout actor with a ``_version`` attribute and a ``_receive(version)``."""

    _link: WeightLink | None = None
    _in_group = False
    _version: int

    def join_weight_sync(self, host: str, port: int, generation: int, rank: int, world: int, backend: str) -> None:
        """Join the weight-sync group's ``generation`` as ``rank`` (blocks until every member has joined)."""
        self.leave_weight_sync()  # the previous generation's group, if any
        self._join(host, port, generation, rank, world, backend)
        self._in_group = True

    def receive_weights(self, version: int) -> int:
        """Receive policy ``version`` from trainer rank 0; returns the version. Outside a group (a
        restarted replica, which the pool gave the weights through the driver) a no-op if this
        replica already has that version."""
        version = int(version)
        if not self._in_group:
            if self._version == version:
                return version
            raise RuntimeError("receive_weights before join_weight_sync: this replica is in no weight-sync group")
        try:
            self._receive(version)
        except BaseException:
            self.leave_weight_sync()  # a broken group: closing it frees the other members' waits
            raise
        self._version = version
        return version

    def leave_weight_sync(self) -> None:
        if self._in_group:
            self._in_group = False
            self._leave()

    # ------------------------------------------------------------------ where the group's end lives
    def _join(self, host: str, port: int, generation: int, rank: int, world: int, backend: str) -> None:
        self._link = WeightLink(host, port, generation, rank, world, backend)

    def _leave(self) -> None:
        self._link = None

    def _receive(self, version: int) -> None:
        raise NotImplementedError
