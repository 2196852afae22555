"""mlcweb: compile PyTorch / diffusers models with Apache TVM Relax for WebGPU and native GPUs."""

__version__ = "0.1.0"
