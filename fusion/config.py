"""FusionConfig: every knob of the compiler in one dataclass."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .lowering import SUPPORTED_OPS


def default_cache_dir() -> Path:
    return Path(os.environ.get("DIFUSE_CACHE_DIR") or Path.home() / ".cache" / "difuse")


@dataclass
class FusionConfig:
    """enable_fusion: off = replay the recorded ops unfused.
    min_nodes / max_nodes: size bounds of a generic group (patterns bring their own).
    min_tensor_elements: skip groups whose largest tensor is smaller (launch-bound, not worth it).
    op_whitelist: ops the generic grouping may fuse (default: all the generic codegen supports).
    fallback_on_error: a kernel that fails to compile or validate is replaced by the unfused ops
        (logged); False raises instead.
    debug_mode: validate every fused kernel against its reference on first use.
    profile: time fused vs fallback on first sighting and keep the fused kernel only if
        t_fused < fusion_ratio * t_fallback (decision persisted beside the kernel).
    backend: "triton" (generated Triton source) or "ninetoothed" (generated arrangement +
        application) for generic groups.
    max_single_block: rows up to this many columns are processed in one block, longer rows loop.
    """

    enable_fusion: bool = True
    min_nodes: int = 2
    max_nodes: int = 64
    min_tensor_elements: int = 0
    op_whitelist: frozenset[str] = field(default_factory=lambda: SUPPORTED_OPS)
    fallback_on_error: bool = True
    debug_mode: bool = False
    profile: bool = False
    fusion_ratio: float = 0.8
    cache_dir: Path = field(default_factory=default_cache_dir)
    backend: str = "triton"
    max_single_block: int = 8192
    max_memory_growth: float = 32.0
    tolerances: dict = field(default_factory=lambda: {
        "float32": (1e-4, 1e-5), "float16": (1e-2, 1e-3), "bfloat16": (2e-2, 1e-2), "float64": (1e-7, 1e-9)})

    def __post_init__(self):
        self.cache_dir = Path(self.cache_dir)
        if self.backend not in ("triton", "ninetoothed"):
            raise ValueError(f"backend must be 'triton' or 'ninetoothed', not {self.backend!r}")
        if not 0 < self.fusion_ratio:
            raise ValueError(f"fusion_ratio must be positive, got {self.fusion_ratio}")
        if self.min_nodes < 1 or self.max_nodes < self.min_nodes:
            raise ValueError(f"need 1 <= min_nodes <= max_nodes, got {self.min_nodes}, {self.max_nodes}")
        if self.max_single_block < 16 or self.max_single_block & (self.max_single_block - 1):
            raise ValueError(f"max_single_block must be a power of two >= 16, got {self.max_single_block}")
        self.op_whitelist = frozenset(self.op_whitelist)
