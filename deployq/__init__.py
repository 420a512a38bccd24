"""deployq: one elastic quantization supernet, many hardware targets.

Importing deployq must stay cheap and must never import onnxruntime-qnn,
tensorrt or CUDA: backends load lazily when first used.
"""

__version__ = "0.1.0"

from deployq.errors import GateFailed, UserError
from deployq.spec import (
    ElasticSpace,
    Form,
    LayerSpec,
    QuantSpec,
    SubnetSpec,
)

__all__ = [
    "ElasticSpace",
    "Form",
    "GateFailed",
    "LayerSpec",
    "QuantSpec",
    "SubnetSpec",
    "UserError",
    "__version__",
]
