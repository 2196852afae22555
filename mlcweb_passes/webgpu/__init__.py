"""WebGPU kernel generators."""
