"""moempi: forward pass of a DeepSeek-V3-shaped MoE stack with large expert parallelism over MPI."""

__version__ = "0.1.0"
