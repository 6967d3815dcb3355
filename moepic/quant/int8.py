"""The `int8` expert format: 8-bit integer groups with float16 scales (quant/group_format.py)."""

from __future__ import annotations

import attrs

from moepic.quant.format import EXPERT_FORMATS
from moepic.quant.group_format import GroupConfig, GroupFormat


@attrs.frozen
class Int8Config(GroupConfig):
    pass


@EXPERT_FORMATS.register("int8", Int8Config)
class Int8Format(GroupFormat):
    bits = 8
