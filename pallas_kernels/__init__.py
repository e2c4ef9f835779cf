"""Pallas kernels for the packed KV cache: quantized page writes and dequant-fused paged attention."""
