"""Small utilities every part uses: the toolkit's files (JSON lines, atomic writes, one-line errors),
argument types with real ranges, the device and compute dtype a run uses, and replacing a submodule
by name."""
