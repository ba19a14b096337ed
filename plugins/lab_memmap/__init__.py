"""Token windows from uint16/uint32 token files through numpy.memmap. (Being built out.)"""
from pydantic import BaseModel, Field

from lab import hookimpl
from lab.interfaces import DataSource


class MemmapConfig(BaseModel):
    path: str = Field("", description="folder with train.bin, val.bin (and meta.json); empty: the shipped tinyshakespeare")


class MemmapData(DataSource):
    def __init__(self, config: MemmapConfig, context):
        raise NotImplementedError


@hookimpl
def lab_components(register):
    register("data", "memmap", MemmapData, MemmapConfig, "random windows from token files via numpy.memmap")
