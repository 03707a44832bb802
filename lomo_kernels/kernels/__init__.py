"""Backend implementations of the fused ops: ``reference`` (torch), ``native`` (compiled C++/CUDA
in ``lomo_kernels._C``), ``triton_update`` (Triton). Chosen per call by ``lomo_kernels.backends``."""
