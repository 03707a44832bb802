"""lomo_kernels: full-parameter fine-tuning with the optimizer update fused into the backward pass."""
from .backends import available_backends
from .ops import (dense_grad_sqnorm_, dense_update_, embedding_grad_sqnorm_, embedding_update_,
                  linear_grad_sqnorm_, linear_update_)
from .optim import AdaLomo, Lomo
from .routing import UnfusedUseError, release

__version__ = "0.1.0"
__all__ = ["Lomo", "AdaLomo", "release", "UnfusedUseError", "available_backends", "linear_update_", "linear_grad_sqnorm_",
           "embedding_update_", "embedding_grad_sqnorm_", "dense_update_", "dense_grad_sqnorm_"]
from .optim import HiFT  # noqa: E402
__all__ += ["HiFT"]
from .optim import AdamW  # noqa: E402
__all__ += ["AdamW"]
from .fused_cross_entropy import (DeferredLMHead, FusedLinearCrossEntropy, LomoHead, NormHead,  # noqa: E402
                                  OptimizerHead, fused_linear_cross_entropy)
from .ops import linear_cross_entropy_grad_sqnorm_, linear_cross_entropy_update_  # noqa: E402
__all__ += ["fused_linear_cross_entropy", "FusedLinearCrossEntropy", "DeferredLMHead", "LomoHead", "NormHead",
            "OptimizerHead",
            "linear_cross_entropy_update_", "linear_cross_entropy_grad_sqnorm_"]
from .optim import Apollo, ApolloMini  # noqa: E402
__all__ += ["Apollo", "ApolloMini"]
