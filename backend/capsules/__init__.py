"""Capsules: lifecycle, snapshots and state, behind one async facade (`CapsuleManager`)."""
