from .adalomo import AdaLomo
from .base import FusedOptimizer
from .lomo import Lomo
from .loss_scaler import DynamicLossScaler

__all__ = ["AdaLomo", "DynamicLossScaler", "FusedOptimizer", "Lomo"]
from .hift import HiFT  # noqa: E402
__all__ += ["HiFT"]
from .adamw import AdamW  # noqa: E402
__all__ += ["AdamW"]
from .apollo import Apollo, ApolloMini  # noqa: E402
__all__ += ["Apollo", "ApolloMini"]
