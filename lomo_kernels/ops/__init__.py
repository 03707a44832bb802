"""The fused ops: each a ``torch.library`` custom op (usable under FakeTensorMode and torch.compile)
behind a checked Python function. See ``_common`` for the semantics all backends share."""
from .dense_update import dense_grad_sqnorm_, dense_update_
from .embedding_update import embedding_grad_sqnorm_, embedding_update_
from .linear_update import choose_norm_method, linear_grad_sqnorm_, linear_update_

__all__ = ["linear_update_", "linear_grad_sqnorm_", "choose_norm_method", "embedding_update_",
           "embedding_grad_sqnorm_", "dense_update_", "dense_grad_sqnorm_"]
from .adamw_update import AdamRule, adamw_dense_update_, adamw_embedding_update_, adamw_linear_update_  # noqa: E402
__all__ += ["AdamRule", "adamw_linear_update_", "adamw_embedding_update_", "adamw_dense_update_"]
from .linear_cross_entropy import (choose_chunk_size, linear_cross_entropy_grad_sqnorm_,  # noqa: E402
                                   linear_cross_entropy_update_, linear_update_rows_)

__all__ += ["linear_cross_entropy_update_", "linear_cross_entropy_grad_sqnorm_", "linear_update_rows_",
            "choose_chunk_size"]
