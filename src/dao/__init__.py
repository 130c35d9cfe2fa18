"""dao-csp: crystal structure prediction with the DAO Siamese foundation models.

Layers (see docs/design.md): ``dao.ops`` (public kernels as torch.library ops),
``dao.reference`` (pure-PyTorch twins), ``dao.data`` (the batched crystal
container and datasets), and the model/diffusion/training layers on top.
"""

from dao._ext import has_cuda_ext, has_triton

__version__ = "0.1.0"

__all__ = ["__version__", "has_cuda_ext", "has_triton"]
