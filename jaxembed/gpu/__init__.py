"""Pallas kernels for NVIDIA GPUs (Triton lowering, tuned for Hopper): prefill attention over
packed rows (`jaxembed.gpu.attention`) and products with weights kept in their quantized blocks
(`jaxembed.gpu.qmatmul`). Each module says what it covers and why it is written as it is; each
kernel takes `interpret=True` to run in Pallas' interpreter on any backend, which is how the tests
check them against XLA on a machine without a GPU. Not imported here: importing them loads
Pallas, which a CPU-only engine does not need."""
