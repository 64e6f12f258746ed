# Type stubs of fp8kv.hf (see hf.py).
from typing import Any, ContextManager, Iterable, Optional

from . import CalibData, Communicator

def cast(model: Any, *args: Any, **kwargs: Any) -> Any:
    """model.to(...) keeping every RoPE inv_freq buffer float32."""

def calibrate(model: Any, batches: Iterable[Any], scheme: str = "per-head", warmup: int = 0,
              count: int = 4000, out: Optional[str] = "kv_cache_calib.json",
              communicator: Optional[Communicator] = None) -> CalibData: ...

class Fp8kvCache:
    scheme: str
    batch_size: int
    max_len: int
    pools: list  # [num_layers] of [batch_size * max_len + 1, 2 * Hkv, D] tensors
    req_to_token: Any  # [batch_size, max_len] int32
    def __init__(self, model: Any, calib: Optional[str] = None, scheme: str = "fp8-per-head",
                 batch_size: int = 1, max_len: int = 4096, device: Any = None) -> None: ...
    def reset(self) -> None: ...
    def attention(self, module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                  scaling: Optional[float] = None, dropout: float = 0.0,
                  **kwargs: Any) -> tuple: ...

def serving(model: Any, cache: Fp8kvCache) -> ContextManager[Fp8kvCache]: ...
def generate(model: Any, input_ids: Any, calib: Optional[str] = None,
             scheme: str = "fp8-per-head", max_new_tokens: int = 32,
             attention_mask: Any = None, **kwargs: Any) -> Any: ...
