"""`brightness`: mean luma of a clip's frame samples, rejecting clips darker than a threshold.

The smallest useful third-party stage: a config section, one `process` method, the samples read through the core's
samples format. `fail_in` exists only so the tests can check how the runners end a run on a ConfigError.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from curation.errors import ConfigError
from curation.samples import SAMPLES_COLUMN, load_samples
from curation.stage import Kind, Resources, Row, Stage, StageConfig, StageContext


class BrightnessConfig(StageConfig):
    min_luma: float = Field(10.0, ge=0, le=255, description="clips darker than this are rejected")
    fail_in: Literal["none", "setup", "process"] = "none"


class Brightness(Stage[BrightnessConfig]):
    name = "brightness"
    version = "1"
    kind = Kind.CLIP
    config_class = BrightnessConfig
    requires = (SAMPLES_COLUMN,)
    default_resources = Resources(cpus=0.25, batch_size=4)
    score_column = "brightness_luma"

    def setup(self, ctx: StageContext) -> None:
        if self.config.fail_in == "setup":
            raise ConfigError("brightness: a bad setting found in setup (set brightness.fail_in: none)")

    def process(self, row: Row) -> Row:
        if self.config.fail_in == "process":
            raise ConfigError("brightness: a bad setting found while processing (set brightness.fail_in: none)")
        frames = load_samples(row)["frames"]
        luma = float((frames[..., 0] * 0.299 + frames[..., 1] * 0.587 + frames[..., 2] * 0.114).mean())
        status, reason = ("ok", None) if luma >= self.config.min_luma else ("reject", "dark")
        return self.row(row, status, reason, luma=luma)
