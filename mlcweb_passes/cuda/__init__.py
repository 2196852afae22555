"""CUDA kernel generators: Hopper wgmma GEMMs, flash attention, tensor-core tiles."""
