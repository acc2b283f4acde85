"""Built-in stages, one module each (or a subpackage when a stage has helpers). Nothing here imports them: the
core finds every stage through the `curation.stages` entry points declared in pyproject.toml."""
