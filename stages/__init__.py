"""Built-in stages. Importing this package registers them; one module per stage, named like the stage."""

from stages import aesthetics, caption, motion, ocr, package, probe, scenecut, subjects, watermark

__all__ = ["aesthetics", "caption", "motion", "ocr", "package", "probe", "scenecut", "subjects", "watermark"]
