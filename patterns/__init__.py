"""difuse.patterns: the fused-op library. Each module holds one pattern: torch reference, matcher,
kernel(s) and bytes-moved model. Importing this package registers every pattern with the
FusionScheduler."""
