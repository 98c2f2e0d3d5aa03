"""Parameterizations that replace ``nn.Linear``: SLTrain (sparse + low-rank) and SST (sparse
spectral training), with conversion of whole models and export back to dense weights."""

from .convert import conversion_summary, convert, to_dense
from .sltrain import SLTrainLinear
from .sst import SSTController, SSTLinear

__all__ = ["SLTrainLinear", "SSTController", "SSTLinear", "conversion_summary", "convert", "to_dense"]
