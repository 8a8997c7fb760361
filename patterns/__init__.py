"""difuse.patterns: the fused-op library. Each module holds one pattern: torch reference, matcher,
kernel(s) and bytes-moved model (the confidence-selection family, the largest, keeps its matchers
in confidence_patterns). Importing this package registers every pattern with the FusionScheduler."""
import difuse.fusion  # noqa: F401,I001  (on CPU-only hosts, selects the Triton interpreter before triton loads)
from difuse.patterns import (  # noqa: F401  (importing registers the patterns)
    add_rms_norm,
    attention,
    confidence_patterns,
    kv_write,
    linear,
    qk_norm,
    rms_norm,
    rope,
    swiglu,
)
