"""The coder (``sglang_speckv.kernels``): KV pages <-> blobs, losslessly.

- ``entropy_model``: the integer model C(k) under a per-scalar (mu, sigma);
- ``rans_reference``: interleaved rANS in torch (CPU), the bytes of record;
- ``rans_triton``: the same coder as Triton kernels (CUDA);
- ``rans_cpu``: the same coder in C++ (``rans_cpu.cpp``, built on first use), used for CPU
  pages; falls back to ``rans_reference`` if it cannot be built;
- ``format``: the blob (docs/FORMAT.md);
- ``page_hash``: the blob's checksum of the raw page, computed on the page's device (torch
  reference; ``page_hash_triton`` on CUDA, ``rans_cpu.page_hash`` on the CPU);
- ``codec``: the batch API, ``encode_pages`` / ``decode_pages``.

docs/DESIGN.md "The coder" describes the math. Nothing is imported here: importing a
submodule never pulls in Triton unless it is the Triton one.
"""
