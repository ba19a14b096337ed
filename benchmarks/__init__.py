"""lab's benchmarks: attention kernels, the training step, generation. Run with `pytest benchmarks/`."""
