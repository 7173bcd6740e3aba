"""Compiled Cython twins of fluxrig's hot paths; see fluxrig._backend for how one is chosen."""
