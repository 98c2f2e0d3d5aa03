"""Tensor-level distributed helpers the optimizers call: the row-split view of sharded matrices
(FSDP2 DTensors) and counted collectives."""

from .comm import COMM, CommStats
from .sharding import MatrixShards, local, matrix_shards

__all__ = ["COMM", "CommStats", "MatrixShards", "local", "matrix_shards"]
