"""padless's fused Triton kernels (RoPE, SwiGLU/GeGLU, RMSNorm, fused linear cross-entropy, varlen attention).

This is *padless's* ``kernels`` package, not Hugging Face's unrelated PyPI package of the same import name
(which transformers and bitsandbytes probe). To keep the two apart:

* ``__padless__`` marks this package as ours; ``train`` refuses to run if ``import kernels`` yields a package
  without it (see ``train.kernels_guard``), and names the file it found and the fix.
* ``__version__`` is ``0.0.0.dev0+padless``: below every version Hugging Face's consumers accept, so
  transformers/bitsandbytes never mistake this package for theirs.
* Importing this package imports nothing heavy (no torch, no triton) and touches no GPU. Each kernel lives in
  its own submodule (``kernels.rope``, ``kernels.swiglu``, ...), imported on demand.
"""

__padless__ = True
__version__ = "0.0.0.dev0+padless"

__all__ = ["__padless__", "__version__"]
