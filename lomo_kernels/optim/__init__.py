from .base import FusedOptimizer
from .lomo import Lomo

__all__ = ["FusedOptimizer", "Lomo"]
