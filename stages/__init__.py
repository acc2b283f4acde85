"""Built-in stages. Importing this package registers them; one module per stage, named like the stage."""

from stages import package, probe, scenecut

__all__ = ["package", "probe", "scenecut"]
