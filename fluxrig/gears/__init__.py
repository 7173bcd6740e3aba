"""Built-in gears. Each module registers its gear type with fluxrig.runtime.registry."""
