"""The VMM layer: one narrow interface, a QEMU implementation behind it."""
