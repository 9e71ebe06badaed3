"""Taking turns with the trainer on shared devices (``placement.layout: colocated``): what every
rollout actor does on ``sleep`` / ``wake``, whatever its backend.

    actor.sleep()      # before the trainer steps: the backend frees its device memory
    actor.wake()       # after: memory back, then the weight sync and the next generate
    actor.generate()   # while asleep: RuntimeError (the loop got the order wrong)

A backend subclasses ``TakesTurns`` and says what freeing and restoring mean for it
(``_release`` / ``_restore``). Both calls are idempotent (a replica Ray restarted while the pool
thought it asleep comes back awake, and ``wake`` then does nothing); ``sleeps`` and ``wakes`` count
the transitions.
"""

from __future__ import annotations


class TakesTurns:
    """``sleep`` / ``wake`` bookkeeping of a rollout actor; the backend frees and restores."""

    _asleep = False
    sleeps = 0  # transitions to asleep so far
    wakes = 0  # transitions back

    def _release(self) -> None:
        """Free the device memory the engine holds (weights, KV cache)."""
        raise NotImplementedError

    def _restore(self) -> None:
        """Take back what ``_release`` freed, so that the engine can generate again."""
        raise NotImplementedError

    def sleep(self) -> None:
        """Free this replica's device memory while the trainer steps on the same device."""
        if not self._asleep:
            self._release()
            self._asleep, self.sleeps = True, self.sleeps + 1

    def wake(self) -> None:
        """Take the device memory back (before the weight sync and the next generate)."""
        if self._asleep:
            self._restore()
            self._asleep, self.wakes = False, self.wakes + 1

    def asleep(self) -> bool:
        return self._asleep

    def _check_awake(self, what: str) -> None:
        if self._asleep:
            raise RuntimeError(
                f"rollout {what} while the replica is asleep (placement.layout=colocated frees its memory "
                "while the trainer steps): call wake() first"
            )
