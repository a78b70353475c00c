"""HyperAttention kernels: the eager reference (`reference`), the CPU path (`cpu`), the Triton path
(`triton_attention`, imported only when used) and the op registration (`op`)."""
