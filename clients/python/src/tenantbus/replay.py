"""Anti-replay state that does not grow with traffic (``bus/src/replay.rs``).

Per sender instance: the highest sequence seen and a 128-bit sliding bitmap of
the sequences just below it (as IPsec and DTLS do). A message is a replay if its
bit is set, or if it is 128 or more sequences behind the highest. The table is
capped at ``max_senders``: at the cap, a new sender is refused
(``replay_state_full``) rather than evicting a live one; senders idle for longer
than the retention (replay window + clock skew) are swept.
"""

from __future__ import annotations

from typing import Dict, List

from .errors import DropReason, EnvelopeError

#: Width of the sliding bitmap, in sequences.
WINDOW_BITS = 128
_MASK = (1 << WINDOW_BITS) - 1


class ReplayGuard:
    """The anti-replay state of one subscription."""

    __slots__ = ("retain_ms", "max_senders", "_senders", "_last_sweep_ms", "last_subject", "last_sender")

    def __init__(self, retain_ms: int, max_senders: int) -> None:
        self.retain_ms = retain_ms
        self.max_senders = max(1, max_senders)
        # instance -> [top, bitmap, last_seen_ms]
        self._senders: Dict[int, List[int]] = {}
        self._last_sweep_ms = 0
        #: The last (full subject, relative subject) seen, so a stream on one
        #: subject validates it once (not part of the replay state).
        self.last_subject: tuple = ("", "")
        #: The last (sender bytes, sender id) validated.
        self.last_sender: tuple = (b"", "")

    def senders(self) -> int:
        """How many sender instances are tracked."""
        return len(self._senders)

    def check(self, instance: int, sequence: int, now_ms: int) -> None:
        """Records ``(instance, sequence)`` seen at ``now_ms``, or raises
        :class:`EnvelopeError` (``replay``, ``replay_state_full``). Nothing is
        recorded for a refused message."""
        if now_ms - self._last_sweep_ms >= max(self.retain_ms // 4, 1):
            self._sweep(now_ms)
        w = self._senders.get(instance)
        if w is not None:
            if now_ms > w[2]:
                w[2] = now_ms
            top = w[0]
            if sequence > top:
                shift = sequence - top
                w[1] = 1 if shift >= WINDOW_BITS else ((w[1] << shift) & _MASK) | 1
                w[0] = sequence
                return
            behind = top - sequence
            if behind >= WINDOW_BITS:
                raise EnvelopeError(DropReason.REPLAY, "too old")
            bit = 1 << behind
            if w[1] & bit:
                raise EnvelopeError(DropReason.REPLAY, "")
            w[1] |= bit
            return
        if len(self._senders) >= self.max_senders:
            self._sweep(now_ms)
            if len(self._senders) >= self.max_senders:
                raise EnvelopeError(DropReason.REPLAY_STATE_FULL, "")
        self._senders[instance] = [sequence, 1, now_ms]

    def _sweep(self, now_ms: int) -> None:
        retain = self.retain_ms
        dead = [i for i, w in self._senders.items() if w[2] + retain < now_ms]
        for i in dead:
            del self._senders[i]
        self._last_sweep_ms = now_ms
