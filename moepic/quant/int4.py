"""The `int4` expert format: 4-bit integer groups, two codes a byte (quant/groups.py `pack_nibbles`), with
float16 scales (quant/group_format.py)."""

from __future__ import annotations

import attrs

from moepic.quant.format import EXPERT_FORMATS
from moepic.quant.group_format import GroupConfig, GroupFormat


@attrs.frozen
class Int4Config(GroupConfig):
    pass


@EXPERT_FORMATS.register("int4", Int4Config)
class Int4Format(GroupFormat):
    bits = 4
