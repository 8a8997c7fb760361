"""Triton source for a RowKernel: one program per row, the row's columns in one block or looped.

The kernel source depends only on the group's structure, dtypes, ranks and block mode, never on
sizes or strides (those are runtime arguments), so one compiled kernel serves every layer and
every shape of the same bucket. Runtime scalars are kernel arguments, never constexpr.
"""
from __future__ import annotations

import math

import torch

from .lowering import FULL, ROWN, Expr, Operand, RowKernel

TL_DTYPE = {
    torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16", torch.float32: "tl.float32",
    torch.float64: "tl.float64", torch.int8: "tl.int8", torch.int16: "tl.int16", torch.int32: "tl.int32",
    torch.int64: "tl.int64", torch.uint8: "tl.uint8", torch.bool: "tl.int1",
}
SINGLE_BLOCK_MAX = 8192
LOOP_BLOCK = 4096


def block_plan(n_cols: int, max_single_block: int = SINGLE_BLOCK_MAX) -> tuple[bool, int, int]:
    """(looped, BLOCK, num_warps) for a row of n_cols columns."""
    block = 1 << max(4, math.ceil(math.log2(n_cols)))
    looped = block > max_single_block
    if looped:
        block = min(LOOP_BLOCK, max_single_block)
    warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    return looped, block, warps


def _literal(value, dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "True" if value else "False"
    if dtype.is_floating_point:
        v = float(value)
        if math.isinf(v):
            return 'float("inf")' if v > 0 else 'float("-inf")'
        if math.isnan(v):
            return 'float("nan")'
        return repr(v)
    return repr(int(value))


class _Emitter:
    def __init__(self, kernel: RowKernel, looped: bool):
        self.k = kernel
        self.looped = looped
        self.dtype = {e.out: e.dtype for e in kernel.exprs}
        self.dtype.update({e.out2: e.dtype2 for e in kernel.exprs if e.out2})

    def cast(self, op: Operand, to: torch.dtype) -> str:
        if op.kind == "literal":
            return f"tl.full([], {_literal(op.ref, to)}, {TL_DTYPE[to]})" if to != torch.bool else _literal(op.ref, to)
        src = f"s{op.ref}" if op.kind == "scalar" else op.ref
        have = self.dtype.get(src) if op.kind == "var" else None
        if to == torch.bool:
            return src if have == torch.bool else f"({src} != 0)"
        if have == to:
            return src
        if op.kind == "scalar":  # a Python number under the interpreter, a tl scalar when compiled
            return f"tl.cast({src}, {TL_DTYPE[to]})"
        return f"{src}.to({TL_DTYPE[to]})"

    def pointwise(self, e: Expr) -> str:
        c = e.params["compute"]
        kind = e.op
        if kind in ("and", "or", "not"):
            c = torch.bool
        a = [self.cast(o, c) for o in e.operands]
        p = {k: self.cast(v, c) for k, v in e.params.items() if isinstance(v, Operand)}
        if kind in ("add", "sub", "rsub") and "alpha" in p:
            if kind == "rsub":
                expr = f"{a[1]} - {p['alpha']} * {a[0]}"
            else:
                expr = f"{a[0]} {'+' if kind == 'add' else '-'} {p['alpha']} * {a[1]}"
        elif kind in ("add", "sub", "mul", "div", "rsub"):
            op = {"add": "+", "sub": "-", "mul": "*", "div": "/"}.get(kind)
            expr = f"{a[1]} - {a[0]}" if kind == "rsub" else f"{a[0]} {op} {a[1]}"
        elif kind in ("eq", "ne", "lt", "le", "gt", "ge"):
            op = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}[kind]
            expr = f"{a[0]} {op} {a[1]}"
        elif kind in ("and", "or"):
            expr = f"{a[0]} {'&' if kind == 'and' else '|'} {a[1]}"
        elif kind == "not":
            expr = f"{a[0]} == 0"
        elif kind == "where":
            cond = self.cast(e.operands[0], torch.bool)
            expr = f"tl.where({cond}, {a[1]}, {a[2]})"
        elif kind in ("maximum", "minimum"):
            expr = f"tl.{kind}({a[0]}, {a[1]})"
        elif kind in ("exp", "log", "sqrt", "rsqrt", "abs", "sigmoid", "sin", "cos", "erf"):
            expr = f"tl.{kind}({a[0]})"
        elif kind == "neg":
            expr = f"-{a[0]}"
        elif kind == "silu":
            expr = f"{a[0]} * tl.sigmoid({a[0]})"
        elif kind == "tanh":
            expr = f"2 * tl.sigmoid(2 * {a[0]}) - 1"
        elif kind == "relu":
            expr = f"tl.maximum({a[0]}, 0)"
        elif kind == "reciprocal":
            expr = f"1 / {a[0]}"
        elif kind == "gelu":
            x = a[0]
            if e.params["approximate"] == "tanh":
                inner = f"0.7978845608028654 * ({x} + 0.044715 * {x} * {x} * {x})"
                expr = f"0.5 * {x} * (1 + (2 * tl.sigmoid(2 * ({inner})) - 1))"
            else:
                expr = f"0.5 * {x} * (1 + tl.erf({x} * 0.7071067811865476))"
        elif kind == "pow":
            x, ex = a[0], float(e.params["exponent"])
            expr = {1.0: x, 2.0: f"{x} * {x}", 3.0: f"{x} * {x} * {x}", 4.0: f"({x} * {x}) * ({x} * {x})",
                    0.5: f"tl.sqrt({x})", -0.5: f"tl.rsqrt({x})", -1.0: f"1 / {x}"}[ex]
        elif kind in ("clamp", "clamp_min", "clamp_max"):
            expr = a[0]
            if "min" in p:
                expr = f"tl.maximum({expr}, {p['min']})"
            if "max" in p:
                expr = f"tl.minimum({expr}, {p['max']})"
        elif kind in ("cast", "identity"):
            expr = a[0]
        elif kind in ("scalar", "fill"):
            op = e.operands[0]
            if op.kind == "literal":
                return f"{e.out} = tl.full([], {_literal(op.ref, e.dtype)}, {TL_DTYPE[e.dtype]})"
            return f"{e.out} = {self.cast(op, e.dtype)}"
        else:
            raise ValueError(f"no Triton form for {kind}")
        result_dtype = torch.bool if kind in ("eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not") else c
        if e.dtype == torch.bool and result_dtype != torch.bool:
            return f"{e.out} = ({expr}) != 0"
        if result_dtype != e.dtype:
            return f"{e.out} = ({expr}).to({TL_DTYPE[e.dtype]})"
        return f"{e.out} = {expr}"

    def load(self, e: Expr) -> str:
        j = e.params["input"]
        inp = self.k.inputs[j]
        if inp.context == FULL:
            return f"{e.out} = tl.load(base_in{j} + cols * cs_in{j}, mask=cmask, other=0)"
        return f"{e.out} = tl.load(base_in{j})"

    def line(self, e: Expr) -> list[str]:
        return [self.load(e) if e.op == "load" else self.pointwise(e)]


def _reduction_source(em: _Emitter, red: Expr, looped: bool) -> tuple[list[str], list[str], list[str]]:
    """(init lines, per-block lines, finalize lines) for the reduction; per-block lines see `cols`,
    `cmask` and the block of the reduced value."""
    src = em.cast(red.operands[0], red.params["acc_dtype"])
    acc = TL_DTYPE[red.params["acc_dtype"]]
    kind, out = red.op, red.out
    ident = {"sum": "0", "mean": "0", "amax": 'float("-inf")', "amin": 'float("inf")', "max": 'float("-inf")',
             "argmax": 'float("-inf")', "softmax": 'float("-inf")', "log_softmax": 'float("-inf")'}[kind]
    masked = f"tl.where(cmask, {src}, {ident})"
    store_dt = TL_DTYPE[red.dtype]
    if not looped:
        body = []
        if kind in ("sum", "mean"):
            body.append(f"{out} = tl.sum({masked}, axis=0)")
            if kind == "mean":
                body.append(f"{out} = {out} / n_cols")
            body.append(f"{out} = {out}.to({store_dt})")
        elif kind in ("amax", "amin"):
            body.append(f"{out} = tl.{'max' if kind == 'amax' else 'min'}({masked}, axis=0).to({store_dt})")
        elif kind == "max":
            body += [f"{out}, {red.out2} = tl.max({masked}, axis=0, return_indices=True, return_indices_tie_break_left=True)",
                     f"{out} = {out}.to({store_dt})", f"{red.out2} = {red.out2}.to(tl.int64)"]
        elif kind == "argmax":
            body.append(f"{out} = tl.argmax({masked}, axis=0, tie_break_left=True).to(tl.int64)")
        else:
            body += [f"red_m = tl.max({masked}, axis=0)", f"red_e = tl.where(cmask, tl.exp({src} - red_m), 0)",
                     "red_s = tl.sum(red_e, axis=0)"]
            if kind == "softmax":
                body.append(f"{out} = (red_e / red_s).to({store_dt})")
            else:
                body.append(f"{out} = ({src} - red_m - tl.log(red_s)).to({store_dt})")
        return [], body, []
    if kind in ("sum", "mean"):
        init = [f"red_acc = tl.zeros([BLOCK], {acc})"]
        step = [f"red_acc += {masked}"]
        fin = [f"{out} = tl.sum(red_acc, axis=0)"] + ([f"{out} = {out} / n_cols"] if kind == "mean" else [])
        fin.append(f"{out} = {out}.to({store_dt})")
    elif kind in ("amax", "amin"):
        f = "maximum" if kind == "amax" else "minimum"
        init = [f"red_acc = tl.full([BLOCK], {ident}, tl.float32)"]
        step = [f"red_acc = tl.{f}(red_acc, {masked})"]
        fin = [f"{out} = tl.{'max' if kind == 'amax' else 'min'}(red_acc, axis=0).to({store_dt})"]
    elif kind in ("max", "argmax"):
        init = ['red_best = tl.full([], float("-inf"), tl.float32)', "red_idx = tl.full([], 0, tl.int64)"]
        step = [f"blk_best, blk_idx = tl.max({masked}, axis=0, return_indices=True, return_indices_tie_break_left=True)",
                "take = blk_best > red_best",
                "red_idx = tl.where(take, blk_idx.to(tl.int64) + start, red_idx)",
                "red_best = tl.where(take, blk_best, red_best)"]
        fin = ([f"{out} = red_best.to({store_dt})", f"{red.out2} = red_idx"] if kind == "max"
               else [f"{out} = red_idx"])
    else:
        init = ['red_m = tl.full([], float("-inf"), tl.float32)', "red_s = tl.full([], 0.0, tl.float32)"]
        step = [f"blk_m = tl.maximum(red_m, tl.max({masked}, axis=0))",
                f"red_s = red_s * tl.exp(red_m - blk_m) + tl.sum(tl.where(cmask, tl.exp({src} - blk_m), 0), axis=0)",
                "red_m = blk_m"]
        fin = []
    return init, step, fin


def _softmax_post(em: _Emitter, red: Expr) -> str:
    src = em.cast(red.operands[0], torch.float32)
    if red.op == "softmax":
        return f"{red.out} = (tl.exp({src} - red_m) / red_s).to({TL_DTYPE[red.dtype]})"
    return f"{red.out} = ({src} - red_m - tl.log(red_s)).to({TL_DTYPE[red.dtype]})"


def generate(kernel: RowKernel, name: str, looped: bool) -> str:
    """Triton source defining `@triton.jit def {name}(...)`."""
    em = _Emitter(kernel, looped)
    k = kernel
    nlead = len(k.lead)
    params = [f"in_ptr{j}" for j in range(len(k.input_values))]
    params += [f"out_ptr{j}" for j in range(len(k.outputs))]
    params += [f"s{j}" for j in range(len(k.scalar_args))]
    for j, inp in enumerate(k.inputs):
        params += [f"rs_in{j}_{d}" for d in range(len(inp.strides) - (1 if inp.context == FULL else 0))]
        if inp.context == FULL:
            params.append(f"cs_in{j}")
    for j, out in enumerate(k.outputs):
        params += [f"rs_out{j}_{d}" for d in range(len(out.row_strides))]
        if out.domain == FULL:
            params.append(f"cs_out{j}")
    params += [f"lead{d}" for d in range(1, nlead)] + ["n_cols", "BLOCK: tl.constexpr"]

    body = ["row = tl.program_id(0).to(tl.int64)"]
    idx = [f"i{d}" for d in range(nlead)]
    if nlead:
        body.append("rest = row")
        for d in range(nlead - 1, 0, -1):
            body += [f"i{d} = rest % lead{d}", f"rest = rest // lead{d}"]
        body.append("i0 = rest")

    def base(prefix: str, ptr: str, strides: list[str], index: list[str]) -> str:
        terms = [f"{i} * {s}" for i, s in zip(index, strides)]
        return f"{prefix} = {ptr}" + "".join(f" + {t}" for t in terms)

    for j, inp in enumerate(k.inputs):
        n_row = len(inp.strides) - (1 if inp.context == FULL else 0)
        index = idx if inp.context != ROWN or n_row == nlead else idx[nlead - n_row:]
        body.append(base(f"base_in{j}", f"in_ptr{inp.index}", [f"rs_in{j}_{d}" for d in range(n_row)], index))
    for j, out in enumerate(k.outputs):
        body.append(base(f"base_out{j}", f"out_ptr{j}", [f"rs_out{j}_{d}" for d in range(len(out.row_strides))], idx))

    red = k.reduction
    red_anc = k.ancestors(red.operands[0].ref) if red else set()
    full_out = [o for o in k.outputs if o.domain == FULL]
    row_out = [o for o in k.outputs if o.domain != FULL]
    full_need: set[str] = set()
    for o in full_out:
        full_need |= k.ancestors(o.var)
    def stores(outs, full: bool) -> list[str]:
        lines = []
        for o in outs:
            j = k.outputs.index(o)
            val = o.var if em.dtype.get(o.var) == o.dtype else f"{o.var}.to({TL_DTYPE[o.dtype]})"
            if full:
                lines.append(f"tl.store(base_out{j} + cols * cs_out{j}, {val}, mask=cmask)")
            else:
                lines.append(f"tl.store(base_out{j}, {val})")
        return lines

    rows_pre = [e for e in k.exprs if e.domain != FULL and e.out in red_anc]
    rows_post = [e for e in k.exprs if e.domain != FULL and e.out not in red_anc and e is not red]
    full_pre = [e for e in k.exprs if e.domain == FULL and e.out in red_anc]
    full_post = [e for e in k.exprs if e.domain == FULL and e.out in full_need and e.out not in red_anc]
    for e in rows_pre:
        body += em.line(e)

    def col_block(start: str) -> list[str]:
        return [f"cols = {start} + tl.arange(0, BLOCK)", "cmask = cols < n_cols"]

    if not looped:
        body += col_block("0")
        for e in full_pre:
            body += em.line(e)
        if red:
            body += _reduction_source(em, red, False)[1]
        for e in rows_post:
            body += em.line(e)
        for e in full_post:
            if e is not red:
                body += em.line(e)
        body += stores(full_out, True) + stores(row_out, False)
    else:
        if red:
            init, step, fin = _reduction_source(em, red, True)
            body += init
            body.append("for start in range(0, n_cols, BLOCK):")
            inner = col_block("start") + [ln for e in full_pre for ln in em.line(e)] + step
            body += ["    " + ln for ln in inner]
            body += fin
        for e in rows_post:
            body += em.line(e)
        if full_out:
            body.append("for start in range(0, n_cols, BLOCK):")
            inner = col_block("start")
            for e in k.exprs:
                if e.domain != FULL or (e.out not in full_need and e is not red):
                    continue
                if e is red:
                    inner.append(_softmax_post(em, red))
                elif e.out in full_need:
                    inner += em.line(e)
            inner += stores(full_out, True)
            body += ["    " + ln for ln in inner]
        body += stores(row_out, False)
    src = ["import triton", "import triton.language as tl", "", "", "@triton.jit",
           f"def {name}({', '.join(params)}):"]
    src += ["    " + ln for ln in body]
    return "\n".join(src) + "\n"


def launch_arguments(kernel: RowKernel) -> list[int]:
    """The size/stride arguments following the tensors and scalars, in `generate`'s order."""
    args: list[int] = []
    for inp in kernel.inputs:
        args += list(inp.strides)
    for out in kernel.outputs:
        args += list(out.row_strides)
        if out.domain == FULL:
            args.append(out.col_stride)
    args += list(kernel.lead[1:]) + [kernel.n_cols]
    return args
