"""The confidence-selection patterns: matchers of the recorded reference forms, fused into the
kernels of difuse.patterns.confidence.

  token_confidence:   max(softmax(logits.float(), -1), -1) -> (confidence, token); the cast is
                      absent for fp32 logits.
  threshold_select / topk_select: the recorded graphs of the references (mask test, -inf fill,
                      acceptance, where + copy_ into the block); threshold as a literal, a
                      ScalarArg or a 0-dim tensor; k as an int tensor [B].
  confidence_threshold_select / confidence_topk_select: token_confidence feeding one of them,
                      when confidence and token have no other reader; fused into the masked-only
                      vocabulary pass + combine/select kernels.
Selection matches output (accept, block after the in-place write).
"""
import torch

from difuse.fusion.ir import ScalarArg
from difuse.fusion.pattern import Pattern, register
from difuse.patterns._match import Walker, is_scalar, last_dim, no_overlap
from difuse.patterns.confidence import (
    confidence_select_bytes,
    confidence_threshold_select,
    confidence_topk_select,
    fused_threshold_select,
    fused_token_confidence,
    fused_topk_select,
    select_bytes,
    threshold_select,
    token_confidence,
    token_confidence_bytes,
    topk_select,
)


def _match_token_confidence(walker: Walker, anchor: int) -> dict | None:
    node = walker.graph.nodes[anchor]
    if node.op != "aten._softmax.default" or node.args[2] is not False:
        return None
    walker.taken.append(anchor)
    x32 = node.inputs[0]
    shape = walker.shape(x32)
    if walker.dtype(x32) != torch.float32 or not last_dim(node.args[1], len(shape)):
        return None
    top = walker.sole_user(node.outputs[0], "aten.max.dim")
    if top is None or not last_dim(top[1].args[1], len(shape)) or (len(top[1].args) > 2 and top[1].args[2]):
        return None
    walker.taken.append(top[0])
    logits = walker.uncast(x32, torch.float32)
    confidence, token = top[1].outputs
    return {"logits": logits, "confidence": confidence, "token": token}


def _match_sampled_confidence(walker: Walker, anchor: int) -> dict | None:
    """The temperature > 0 form: token = argmax(x32 / T - log(empty_like(x32).exponential_())),
    confidence = softmax(x32).gather(token)."""
    g = walker.graph
    draw = g.nodes[anchor]
    if draw.op != "aten.exponential_.default" or len(draw.args) != 1 or draw.kwargs.get("lambd", 1.0) != 1.0 \
            or draw.kwargs.get("generator") is not None:
        return None
    walker.taken.append(anchor)
    buffer = draw.inputs[0]
    while walker.node(buffer) is not None and walker.node(buffer).op == "aten.detach.default":
        buffer = walker.take(buffer, "aten.detach.default").inputs[0]
    empty = walker.take(buffer, "aten.empty_like.default")
    if empty is None or empty.kwargs.get("dtype") is not None:
        return None
    x32 = empty.inputs[0]
    if walker.dtype(x32) != torch.float32:
        return None
    log = walker.sole_user(draw.outputs[0], "aten.log.default")
    if log is None:
        return None
    walker.taken.append(log[0])
    race = walker.sole_user(log[1].outputs[0], "aten.sub.Tensor")
    if race is None or getattr(race[1].args[1], "name", None) != log[1].outputs[0] \
            or race[1].kwargs.get("alpha", 1) != 1:
        return None
    walker.taken.append(race[0])
    scaled = walker.take(race[1].args[0].name, "aten.div.Tensor")
    if scaled is None or scaled.inputs != (x32,) or not is_scalar(scaled.args[1]):
        return None
    temperature = scaled.args[1]
    argmax = walker.sole_user(race[1].outputs[0], "aten.argmax.default")
    ndim = len(walker.shape(x32))
    if argmax is None or not last_dim(argmax[1].args[1], ndim) or (len(argmax[1].args) > 2 and argmax[1].args[2]):
        return None
    walker.taken.append(argmax[0])
    token = argmax[1].outputs[0]
    index = [i for i in walker.users(token) if g.nodes[i].op == "aten.unsqueeze.default"]
    if len(index) != 1 or not last_dim(g.nodes[index[0]].args[1], ndim):
        return None
    walker.taken.append(index[0])
    gather = walker.sole_user(g.nodes[index[0]].outputs[0], "aten.gather.default")
    if gather is None or not last_dim(gather[1].args[1], ndim):
        return None
    softmax = walker.take(gather[1].args[0].name, "aten._softmax.default")
    if softmax is None or softmax.inputs != (x32,) or not last_dim(softmax.args[1], ndim) or softmax.args[2]:
        return None
    walker.taken.append(gather[0])
    squeeze = walker.sole_user(gather[1].outputs[0], "aten.squeeze.dim")
    if squeeze is None or not last_dim(squeeze[1].args[1], ndim):
        return None
    walker.taken.append(squeeze[0])
    return {"logits": walker.uncast(x32, torch.float32), "confidence": squeeze[1].outputs[0], "token": token,
            "temperature": temperature}


def _match_masked_fill(walker: Walker, eq_index: int) -> dict | None:
    """masked = block == mask_id; conf = where(masked, confidence, -inf)."""
    g = walker.graph
    eq = g.nodes[eq_index]
    mask_id = eq.args[1] if eq.op == "aten.eq.Scalar" else None
    if len(eq.inputs) != 1 or not (isinstance(mask_id, ScalarArg) or type(mask_id) is int):
        return None
    block = eq.inputs[0]
    if len(walker.shape(block)) != 2 or walker.dtype(block) not in (torch.int64, torch.int32):
        return None
    walker.taken.append(eq_index)
    masked = eq.outputs[0]
    fills = [i for i in walker.users(masked) if g.nodes[i].op == "aten.where.self"
             and getattr(g.nodes[i].args[0], "name", None) == masked]
    for i in fills:
        where = g.nodes[i]
        confidence, fill = where.args[1], where.args[2]
        fill_name = getattr(fill, "name", None)
        fill_node = walker.node(fill_name) if fill_name else None
        if fill_node is None or fill_node.op != "aten.scalar_tensor.default" or fill_node.args[0] != float("-inf"):
            continue
        walker.take(fill.name, "aten.scalar_tensor.default")
        walker.taken.append(i)
        return {"block": block, "mask_id": mask_id, "masked": masked, "confidence": confidence.name,
                "filled": where.outputs[0]}
    return None


def _match_write_back(walker: Walker, accept: str, block: str) -> dict | None:
    """block.copy_(where(accept, token, block))."""
    where = walker.sole_user(accept, "aten.where.self")
    if where is None or getattr(where[1].args[2], "name", None) != block:
        return None
    token = getattr(where[1].args[1], "name", None)
    copy = walker.sole_user(where[1].outputs[0], "aten.copy_.default")
    if token is None or copy is None or getattr(copy[1].args[0], "name", None) != block:
        return None
    walker.taken += [where[0], copy[0]]
    return {"token": token, "block_out": copy[1].outputs[0]}


def _match_accept_and_write(walker: Walker, chosen: str, fill: dict) -> dict | None:
    """accept = chosen & masked, then the write-back of the accepted tokens: the tail both
    selections share. Returns the fill, the write-back and accept."""
    both = walker.sole_user(chosen, ("aten.bitwise_and.Tensor", "aten.logical_and.default"))
    if both is None or getattr(walker.other_operand(both[1], chosen), "name", None) != fill["masked"]:
        return None
    walker.taken.append(both[0])
    accept = both[1].outputs[0]
    back = _match_write_back(walker, accept, fill["block"])
    return back and {**fill, **back, "accept": accept}


def _undetached(walker: Walker, value: str) -> str:
    """Step back over detach ops producing `value`, taking them."""
    while walker.node(value) is not None and walker.node(value).op == "aten.detach.default":
        walker.take(value, "aten.detach.default")
        value = walker.node(value).inputs[0]
    return value


def _match_threshold_select(walker: Walker, eq_index: int) -> dict | None:
    g = walker.graph
    fill = _match_masked_fill(walker, eq_index)
    if fill is None:
        return None
    filled = fill["filled"]
    users = walker.users(filled)
    ops = {g.nodes[i].op: i for i in users}
    if len(users) != 3 or set(ops) - {"aten.amax.default", "aten.ge.Scalar", "aten.ge.Tensor", "aten.eq.Tensor"}:
        return None
    amax, eq = g.nodes[ops.get("aten.amax.default", -1)], ops.get("aten.eq.Tensor")
    ge = ops.get("aten.ge.Scalar", ops.get("aten.ge.Tensor"))
    if "aten.amax.default" not in ops or eq is None or ge is None:
        return None
    if not last_dim(amax.args[1], 2) or not (len(amax.args) > 2 and amax.args[2]):
        return None
    row_best = amax.outputs[0]
    if getattr(walker.other_operand(g.nodes[eq], filled), "name", None) != row_best:
        return None
    ge_node = g.nodes[ge]
    if getattr(ge_node.args[0], "name", None) != filled:
        return None
    threshold = ge_node.args[1]
    threshold_input = None
    if ge_node.op == "aten.ge.Tensor":
        threshold_input = threshold.name
        if walker.shape(threshold_input) != () or not walker.dtype(threshold_input).is_floating_point:
            return None
    elif not is_scalar(threshold):
        return None
    walker.taken += [ops["aten.amax.default"], eq, ge]
    either = walker.sole_user(ge_node.outputs[0], ("aten.bitwise_or.Tensor", "aten.logical_or.default"))
    if either is None or getattr(walker.other_operand(either[1], ge_node.outputs[0]), "name", None) \
            != g.nodes[eq].outputs[0]:
        return None
    walker.taken.append(either[0])
    written = _match_accept_and_write(walker, either[1].outputs[0], fill)
    return written and {**written, "threshold": threshold, "threshold_input": threshold_input}


def _match_topk_select(walker: Walker, eq_index: int) -> dict | None:
    g = walker.graph
    fill = _match_masked_fill(walker, eq_index)
    if fill is None:
        return None
    sort = walker.sole_user(fill["filled"], "aten.sort.stable")
    if sort is None or sort[1].kwargs.get("stable") is not True or sort[1].kwargs.get("descending") is not True:
        return None
    if not last_dim(sort[1].kwargs.get("dim", -1), 2):
        return None
    walker.taken.append(sort[0])
    order = sort[1].outputs[1]
    users = walker.users(order)
    scatter = [i for i in users if g.nodes[i].op == "aten.scatter_.src"]
    empty = [i for i in users if g.nodes[i].op == "aten.empty_like.default"]
    if len(scatter) != 1 or len(empty) != 1 or len(users) != 2:
        return None
    node = g.nodes[scatter[0]]
    if not last_dim(node.args[1], 2) or getattr(node.args[2], "name", None) != order:
        return None
    # scatter_ destination: empty_like(order) (possibly through detach); source: arange expanded
    buffer = _undetached(walker, node.args[0].name)
    if walker.graph.producer(buffer) != empty[0]:
        return None
    walker.taken += [empty[0], scatter[0]]
    source = node.args[3].name
    expand = walker.take(source, "aten.expand.default")
    if expand is None:
        return None
    source = _undetached(walker, expand.inputs[0])
    arange = walker.take(source, "aten.arange.default")
    if arange is None or arange.args[0] != walker.shape(fill["filled"])[-1]:
        return None
    rank = node.outputs[0]
    less = walker.sole_user(rank, "aten.lt.Tensor")
    if less is None or getattr(less[1].args[0], "name", None) != rank:
        return None
    k_row = walker.take(less[1].args[1].name, "aten.unsqueeze.default")
    if k_row is None or k_row.args[1] not in (-1, 1):
        return None
    k = k_row.inputs[0]
    if walker.shape(k) != walker.shape(fill["block"])[:1] or walker.dtype(k) not in (torch.int64, torch.int32):
        return None
    walker.taken.append(less[0])
    written = _match_accept_and_write(walker, less[1].outputs[0], fill)
    return written and {**written, "k": k}


def _select_candidates(graph, matcher) -> list[tuple[Walker, dict]]:
    found = []
    for i, node in enumerate(graph.nodes):
        if node.op == "aten.eq.Scalar":
            walker = Walker(graph)
            hit = matcher(walker, i)
            if hit and walker.closed([hit["accept"], hit["block_out"]]):
                found.append((walker, hit))
    return found


def _select_outputs(walker: Walker, hit: dict) -> tuple[str, str]:
    return hit["accept"], hit["block_out"]


def _with_confidence(graph, walker: Walker, hit: dict) -> tuple[Walker, dict] | None:
    """Extend a selection match backwards over the token_confidence that feeds it."""
    producer = graph.producer(hit["confidence"])
    if producer is None or graph.nodes[producer].op != "aten.max.dim":
        return None
    if graph.nodes[producer].outputs != (hit["confidence"], hit["token"]):
        return None
    softmax = graph.producer(graph.nodes[producer].inputs[0])
    if softmax is None:
        return None
    joint = Walker(graph)
    joint.taken = list(walker.taken)
    conf = _match_token_confidence(joint, softmax)
    if conf is None or not joint.closed([hit["accept"], hit["block_out"]]):
        return None
    return joint, conf


def _mask_params(hit: dict) -> dict:
    return {"mask_id": hit["mask_id"]}


class TokenConfidencePattern(Pattern):
    name = "token_confidence"
    priority = 10

    def match(self, graph):
        matches = []
        for i, node in enumerate(graph.nodes):
            if node.op == "aten._softmax.default":
                walker = Walker(graph)
                hit = _match_token_confidence(walker, i)
                if hit and walker.closed([hit["confidence"], hit["token"]]):
                    matches.append(walker.match(self.name, (hit["logits"],), (hit["confidence"], hit["token"])))
        return no_overlap(matches)

    def reference(self, logits):
        return token_confidence(logits)

    def kernel(self, logits):
        return fused_token_confidence(logits)

    def bytes_moved(self, logits):
        return token_confidence_bytes(logits)


def _fresh_seed(device: torch.device) -> torch.Tensor:
    """A seed drawn on the device from torch's generator: honours torch.manual_seed, differs per
    call, and is captured correctly by CUDA graphs (no host round trip)."""
    return torch.randint(0, 2**62, (), device=device, dtype=torch.int64)


class SampledTokenConfidencePattern(Pattern):
    """token_confidence at temperature > 0; the exponential race is drawn in-kernel (tl.rand) from a
    seed drawn with torch's generator, so tokens follow the same distribution, not the same bits."""

    name = "sampled_token_confidence"
    priority = 10
    stochastic = True  # kernel and reference draw different noise: compare distributions, not values

    def match(self, graph):
        matches = []
        for i, node in enumerate(graph.nodes):
            if node.op == "aten.exponential_.default":
                walker = Walker(graph)
                hit = _match_sampled_confidence(walker, i)
                if hit and walker.closed([hit["confidence"], hit["token"]]):
                    matches.append(walker.match(self.name, (hit["logits"],), (hit["confidence"], hit["token"]),
                                                temperature=hit["temperature"]))
        return no_overlap(matches)

    def reference(self, logits, temperature):
        return token_confidence(logits, temperature)

    def kernel(self, logits, temperature):
        return fused_token_confidence(logits, temperature, seed=_fresh_seed(logits.device))

    def output_ranges(self, logits, temperature):
        # a probability (fp32 softmax may round a hair above 1), a vocabulary index
        return [(0.0, 1.0 + 1e-5), (0, logits.shape[-1] - 1)]

    def bytes_moved(self, logits, temperature=1.0):
        return token_confidence_bytes(logits)


def _threshold_call(fn, inputs, mask_id, threshold):
    """inputs end with the threshold tensor when the graph compared against one."""
    if threshold is None:
        *tensors, threshold = inputs
    else:
        tensors = inputs
    return fn(*tensors, mask_id, threshold)


class ThresholdSelectPattern(Pattern):
    name = "threshold_select"
    priority = 10

    def match(self, graph):
        matches = []
        for walker, hit in _select_candidates(graph, _match_threshold_select):
            inputs = (hit["confidence"], hit["token"], hit["block"])
            params = _mask_params(hit)
            if hit["threshold_input"] is not None:
                inputs += (hit["threshold_input"],)
            else:
                params["threshold"] = hit["threshold"]
            matches.append(walker.match(self.name, inputs, _select_outputs(walker, hit), **params))
        return no_overlap(matches)

    def reference(self, confidence, token, block, *threshold_tensor, mask_id, threshold=None):
        accept = _threshold_call(threshold_select, (confidence, token, block, *threshold_tensor), mask_id, threshold)
        return accept, block

    def kernel(self, confidence, token, block, *threshold_tensor, mask_id, threshold=None):
        accept = _threshold_call(fused_threshold_select, (confidence, token, block, *threshold_tensor), mask_id,
                                 threshold)
        return accept, block

    def bytes_moved(self, confidence, token, block, *_, **__):
        return select_bytes(confidence, token, block)


class TopKSelectPattern(Pattern):
    name = "topk_select"
    priority = 10

    def match(self, graph):
        matches = []
        for walker, hit in _select_candidates(graph, _match_topk_select):
            inputs = (hit["confidence"], hit["token"], hit["block"], hit["k"])
            matches.append(walker.match(self.name, inputs, _select_outputs(walker, hit), **_mask_params(hit)))
        return no_overlap(matches)

    def reference(self, confidence, token, block, k, mask_id):
        return topk_select(confidence, token, block, mask_id, k), block

    def kernel(self, confidence, token, block, k, mask_id):
        return fused_topk_select(confidence, token, block, mask_id, k), block

    def bytes_moved(self, confidence, token, block, k, **_):
        return select_bytes(confidence, token, block)


def _confidence_select_hits(graph, match_select):
    """(joined walker, confidence hit, selection hit) for every selection fed by token_confidence."""
    for walker, hit in _select_candidates(graph, match_select):
        joined = _with_confidence(graph, walker, hit)
        if joined is not None:
            yield (*joined, hit)


class ConfidenceThresholdSelectPattern(Pattern):
    name = "confidence_threshold_select"
    priority = 40

    def match(self, graph):
        matches = []
        for joint, conf, hit in _confidence_select_hits(graph, _match_threshold_select):
            inputs = (conf["logits"], hit["block"])
            params = _mask_params(hit)
            if hit["threshold_input"] is not None:
                inputs += (hit["threshold_input"],)
            else:
                params["threshold"] = hit["threshold"]
            matches.append(joint.match(self.name, inputs, _select_outputs(joint, hit), **params))
        return no_overlap(matches)

    def reference(self, logits, block, *threshold_tensor, mask_id, threshold=None):
        confidence, token = token_confidence(logits)
        accept = _threshold_call(threshold_select, (confidence, token, block, *threshold_tensor), mask_id, threshold)
        return accept, block

    def kernel(self, logits, block, *threshold_tensor, mask_id, threshold=None):
        accept = _threshold_call(confidence_threshold_select, (logits, block, *threshold_tensor), mask_id, threshold)
        return accept, block

    def bytes_moved(self, logits, block, *_, **__):
        return confidence_select_bytes(logits, block)


class ConfidenceTopKSelectPattern(Pattern):
    name = "confidence_topk_select"
    priority = 40

    def match(self, graph):
        matches = []
        for joint, conf, hit in _confidence_select_hits(graph, _match_topk_select):
            matches.append(joint.match(self.name, (conf["logits"], hit["block"], hit["k"]),
                                       _select_outputs(joint, hit), **_mask_params(hit)))
        return no_overlap(matches)

    def reference(self, logits, block, k, mask_id):
        confidence, token = token_confidence(logits)
        return topk_select(confidence, token, block, mask_id, k), block

    def kernel(self, logits, block, k, mask_id):
        return confidence_topk_select(logits, block, mask_id, k), block

    def bytes_moved(self, logits, block, k, **_):
        return confidence_select_bytes(logits, block)


for _pattern in (ConfidenceThresholdSelectPattern, ConfidenceTopKSelectPattern, TokenConfidencePattern,
                 SampledTokenConfidencePattern,
                 ThresholdSelectPattern, TopKSelectPattern):
    register(_pattern())
