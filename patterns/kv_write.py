"""RoPE fused with the KV-cache write of one attention layer.

A cached step rotates its new keys and writes them, with its new values, into the layer's static
[B, H_kv, L, D] buffers at the step's rows:

    keys.index_copy_(2, rows, apply_rope(k, cos, sin).transpose(1, 2))
    values.index_copy_(2, rows, v.transpose(1, 2))

(k, v: [B, T, H_kv, D]; rows: [T]), with qk_norm before the rotation for the QK-norm families.
Unfused that is a rope kernel, a [B, T, H, D] temporary and two scatter kernels per layer; fused,
one kernel reads k and v once and writes the rotated keys and the values straight into the buffers.
"""
from difuse.patterns.qk_norm import qk_norm_rope
from difuse.patterns.rope import apply_rope, launch_norm_rope


def rope_kv_write(k, cos, sin, rows, keys, values, v):
    """Reference: the unfused cache write. Returns the two buffers, written in place."""
    keys.index_copy_(2, rows, apply_rope(k, cos, sin).transpose(1, 2))
    values.index_copy_(2, rows, v.transpose(1, 2))
    return keys, values


def qk_norm_rope_kv_write(k, weight, cos, sin, rows, keys, values, v, eps):
    """Reference with the per-head RMSNorm of k first."""
    keys.index_copy_(2, rows, qk_norm_rope(k, weight, eps, cos, sin).transpose(1, 2))
    values.index_copy_(2, rows, v.transpose(1, 2))
    return keys, values


def fused_rope_kv_write(k, cos, sin, rows, keys, values, v):
    launch_norm_rope(k, None, 0.0, cos, sin, out=keys, rows=rows, v=v, v_out=values)
    return keys, values


def fused_qk_norm_rope_kv_write(k, weight, cos, sin, rows, keys, values, v, eps):
    launch_norm_rope(k, weight, float(eps), cos, sin, out=keys, rows=rows, v=v, v_out=values)
    return keys, values


def kv_write_bytes(k, cos, rows, keys, v, weight=None) -> int:
    """k and v read and written once each (rows of the buffers), the cos/sin tables and rows read."""
    moved = k.numel() * (k.element_size() + keys.element_size()) + 2 * v.numel() * v.element_size()
    moved += 2 * cos.numel() * cos.element_size() + rows.numel() * rows.element_size()
    return moved + (weight.numel() * weight.element_size() if weight is not None else 0)


# ---------------------------------------------------------------------------------------------
# Patterns: a rope (or qk_norm_rope) match whose output is only read by
#   transpose(1, 2) -> index_copy_(keys, 2, rows, .)
# together with the same step's value write, index_copy_(values, 2, rows, transpose(v, 1, 2)) at
# the same rows tensor with v shaped like k. Both buffers (after the writes) are the outputs.

from difuse.fusion.ir import Ref  # noqa: E402
from difuse.fusion.pattern import Pattern, register  # noqa: E402
from difuse.patterns._match import Walker, no_overlap  # noqa: E402
from difuse.patterns.qk_norm import qk_norm_rope_candidates  # noqa: E402
from difuse.patterns.rope import match_rope_at, rope_anchors  # noqa: E402

INDEX_COPY = "aten.index_copy_.default"


def _swaps_heads_and_tokens(walker: Walker, node) -> bool:
    """transpose(1, 2) of a 4-d tensor, in any spelling of the two dims."""
    ndim = len(walker.shape(node.inputs[0]))
    return ndim == 4 and sorted(d % ndim for d in node.args[1:3]) == [1, 2]


def _write_of(walker: Walker, node_index: int, source: str) -> dict | None:
    """index_copy_(buffer, 2, rows, source) -> its buffer, rows and written-buffer value names."""
    node = walker.graph.nodes[node_index]
    buffer, dim, rows, written = (tuple(node.args) + (None,) * 4)[:4]
    if node.op != INDEX_COPY or dim not in (2, -2) or not all(isinstance(a, Ref) for a in (buffer, rows, written)) \
            or written.name != source:
        return None
    return {"buffer": buffer.name, "rows": rows.name, "out": node.outputs[0], "index": node_index}


def _match_transposed_write(walker: Walker, value: str) -> dict | None:
    """value -> transpose(1, 2) -> index_copy_ as value's only use; takes both nodes."""
    swap = walker.sole_user(value, "aten.transpose.int")
    if swap is None or not _swaps_heads_and_tokens(walker, swap[1]):
        return None
    write = walker.sole_user(swap[1].outputs[0], INDEX_COPY)
    found = write and _write_of(walker, write[0], swap[1].outputs[0])
    if not found or walker.dtype(found["buffer"]) != walker.dtype(value):
        return None
    walker.taken += [swap[0], write[0]]
    return found


def _match_value_write(walker: Walker, key_write: dict, k: str) -> dict | None:
    """The next index_copy_ at the same rows after the key write (later ones belong to later
    layers), if its source is transpose(v, 1, 2) with v shaped like k, into another buffer."""
    later = [i for i in sorted(walker.users(key_write["rows"]))
             if i > key_write["index"] and walker.graph.nodes[i].op == INDEX_COPY]
    source = walker.graph.nodes[later[0]].args[3] if later and len(walker.graph.nodes[later[0]].args) > 3 else None
    swap = walker.node(source.name) if isinstance(source, Ref) else None
    if swap is None or swap.op != "aten.transpose.int" or walker.shape(swap.inputs[0]) != walker.shape(k):
        return None
    candidate = Walker(walker.graph)
    found = _match_transposed_write(candidate, swap.inputs[0])
    if not found or found["index"] != later[0] or found["buffer"] == key_write["buffer"]:
        return None
    walker.taken += candidate.taken
    return {**found, "v": swap.inputs[0]}


def _kv_write_around(walker: Walker, rotated: str, k: str) -> dict | None:
    keys = _match_transposed_write(walker, rotated)
    values = keys and _match_value_write(walker, keys, k)
    if not values or not walker.closed([keys["out"], values["out"]]):
        return None
    return {"rows": keys["rows"], "keys": keys["buffer"], "values": values["buffer"], "v": values["v"],
            "outputs": (keys["out"], values["out"])}


class RoPEKVWritePattern(Pattern):
    name = "rope_kv_write"
    priority = 45  # before rope, which would take the rotation alone

    def match(self, graph):
        matches = []
        for anchor in rope_anchors(graph):
            walker = Walker(graph)
            rope = match_rope_at(walker, anchor)
            write = rope and _kv_write_around(walker, rope["out"], rope["x"])
            if write:
                matches.append(walker.match(self.name, (rope["x"], rope["cos"], rope["sin"], write["rows"],
                                                        write["keys"], write["values"], write["v"]),
                                            write["outputs"]))
        return no_overlap(matches)

    def reference(self, k, cos, sin, rows, keys, values, v):
        return rope_kv_write(k, cos, sin, rows, keys, values, v)

    def kernel(self, k, cos, sin, rows, keys, values, v):
        return fused_rope_kv_write(k, cos, sin, rows, keys, values, v)

    def bytes_moved(self, k, cos, sin, rows, keys, values, v):
        return kv_write_bytes(k, cos, rows, keys, v)


class QKNormRoPEKVWritePattern(Pattern):
    name = "qk_norm_rope_kv_write"
    priority = 50  # before rope_kv_write and qk_norm_rope, which would take parts of it

    def match(self, graph):
        matches = []
        for walker, norm, rope in qk_norm_rope_candidates(graph):
            write = _kv_write_around(walker, rope["out"], norm["x"])
            if write:
                matches.append(walker.match(self.name, (norm["x"], norm["weight"], rope["cos"], rope["sin"],
                                                        write["rows"], write["keys"], write["values"], write["v"]),
                                            write["outputs"], eps=norm["eps"]))
        return no_overlap(matches)

    def reference(self, k, weight, cos, sin, rows, keys, values, v, eps):
        return qk_norm_rope_kv_write(k, weight, cos, sin, rows, keys, values, v, eps)

    def kernel(self, k, weight, cos, sin, rows, keys, values, v, eps):
        return fused_qk_norm_rope_kv_write(k, weight, cos, sin, rows, keys, values, v, eps)

    def bytes_moved(self, k, weight, cos, sin, rows, keys, values, v, eps=0.0):
        return kv_write_bytes(k, cos, rows, keys, v, weight)


register(RoPEKVWritePattern())
register(QKNormRoPEKVWritePattern())
