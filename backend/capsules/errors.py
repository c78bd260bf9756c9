from __future__ import annotations


class CapsuleError(Exception):
    """A capsule operation failed; the message says what, why and what to do."""


class CapsuleNotFound(CapsuleError):
    pass


class IllegalTransition(CapsuleError):
    """The operation does not apply to the capsule's current state."""


class SnapshotCorrupt(CapsuleError):
    pass
