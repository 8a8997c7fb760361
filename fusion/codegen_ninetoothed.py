"""ninetoothed module for a RowKernel: an arrangement (one program per row, the row's columns in
BLOCK-sized tiles) and an application generated from the same expressions as the Triton backend.

ninetoothed reads the application's source with `inspect`, so the module is written to the cache
dir and imported as a real file; `ninetoothed.make` is called once per module (it costs 50-200 ms).
Every operand is passed as a view of the row space: full operands as S = [*L, N], per-row
operands and outputs as [*L, 1]. Runtime scalars are Tensor(0) arguments, never constexpr.
"""
from __future__ import annotations

import torch

from . import codegen_triton
from .lowering import FULL, ROW, ROWN, RowKernel

class _Emitter(codegen_triton._Emitter):
    def load(self, e):
        j = e.params["input"]
        if self.k.inputs[j].context == FULL:
            return f"{e.out} = p_in{j}[i]"
        return f"{e.out} = p_in{j}"


def _params(kernel: RowKernel) -> tuple[list[str], list[str], list[str]]:
    ins = [f"p_in{j}" for j in range(len(kernel.inputs))]
    outs = [f"p_out{j}" for j in range(len(kernel.outputs))]
    scalars = [f"s{j}" for j in range(len(kernel.scalar_args))]
    return ins, outs, scalars


def generate(kernel: RowKernel, block: int) -> str:
    """Module source defining `arrangement`, `application` and `tensors` (the `make` triple). The
    columns are always walked in BLOCK tiles; a row that fits one tile loops once."""
    k = kernel
    em = _Emitter(kernel, looped=True)
    ins, outs, scalars = _params(kernel)
    full_params = [p for p, inp in zip(ins, k.inputs) if inp.context == FULL]
    full_params += [p for p, o in zip(outs, k.outputs) if o.domain == FULL]
    if not full_params:
        raise ValueError("a ninetoothed row kernel needs at least one full-row operand")
    anchor = full_params[0]
    nlead = len(k.lead)
    squeeze = f"tuple(range({nlead}))"

    red = k.reduction
    red_anc = k.ancestors(red.operands[0].ref) if red else set()
    full_out = [(j, o) for j, o in enumerate(k.outputs) if o.domain == FULL]
    row_out = [(j, o) for j, o in enumerate(k.outputs) if o.domain != FULL]
    full_need: set[str] = set()
    for _, o in full_out:
        full_need |= k.ancestors(o.var)

    def store(j, o, full):
        val = o.var if em.dtype.get(o.var) == o.dtype else f"{o.var}.to({codegen_triton.TL_DTYPE[o.dtype]})"
        return f"p_out{j}[i] = {val}" if full else f"p_out{j} = {val}"

    body = [f"n_cols = {anchor}.source.shape[-1]"]
    body += [ln for e in k.exprs if e.domain != FULL and e.out in red_anc for ln in em.line(e)]
    header = [f"for i in range({anchor}.shape[-1]):", f"    cmask = {anchor}[i].offsets(-1) < n_cols",
              f"    start = i * {block}"]
    if red:
        init, step, fin = codegen_triton._reduction_source(em, red, True)
        body += [ln.replace("[BLOCK]", f"[{block}]") for ln in init]
        body += header + ["    " + ln for e in k.exprs if e.domain == FULL and e.out in red_anc for ln in em.line(e)]
        body += ["    " + ln for ln in step]
        body += fin
    body += [ln for e in k.exprs if e.domain != FULL and e.out not in red_anc and e is not red for ln in em.line(e)]
    if full_out:
        body += header
        for e in k.exprs:
            if e.domain != FULL or (e.out not in full_need and e is not red):
                continue
            lines = [codegen_triton._softmax_post(em, red)] if e is red else em.line(e)
            body += ["    " + ln for ln in lines]
        body += ["    " + store(j, o, True) for j, o in full_out]
    body += [store(j, o, False) for j, o in row_out]
    body = [ln.replace("tl.", "ntl.").replace("nntl.", "ntl.") for ln in body]

    arrange = [f"def arrangement({', '.join(ins + outs + scalars)}):"]
    for p in ins + outs:
        is_full = p in full_params
        if is_full:
            arrange += [f"    {p} = {p}.tile({(1,) * nlead + (block,)}).tile({(1,) * nlead + (-1,)})"]
            if nlead:
                arrange += [f"    {p}.dtype = {p}.dtype.squeeze({squeeze})",
                            f"    {p}.dtype.dtype = {p}.dtype.dtype.squeeze({squeeze})"]
        else:
            arrange += [f"    {p} = {p}.tile({(1,) * (nlead + 1)})",
                        f"    {p}.dtype = {p}.dtype.squeeze(tuple(range({nlead + 1})))"]
    arrange.append(f"    return {', '.join(ins + outs + scalars)}")

    tensors = [f"Tensor({nlead + 1}, other=0)"] * len(k.inputs) + [f"Tensor({nlead + 1})"] * len(k.outputs)
    tensors += ["Tensor(0)"] * len(k.scalar_args)
    src = ["import ninetoothed", "import ninetoothed.language as ntl", "from ninetoothed import Tensor", "", ""]
    src += arrange + ["", ""]
    src += [f"def application({', '.join(ins + outs + scalars)}):"] + ["    " + ln for ln in body]
    src += ["", "", f"tensors = ({', '.join(tensors)},)", ""]
    return "\n".join(src)


def launcher(kernel: RowKernel, module, block: int, device: str):
    """Build the ninetoothed handle once (memoised per module) and a launch function that views
    every operand as the row space."""
    from . import ninetoothed_compat

    ninetoothed_compat.apply()
    import ninetoothed

    handle = getattr(module, "_difuse_handle", None)
    if handle is None:
        handle = ninetoothed.make(module.arrangement, module.application, module.tensors)
        module._difuse_handle = handle
    k = kernel
    full = (*k.lead, k.n_cols)
    row = (*k.lead, 1)
    names = [f"x{j}" for j in range(len(k.input_values))]
    scalars = [f"s{j}" for j in range(len(k.scalar_args))]
    lines = [f"def launch({', '.join(names + scalars)}):"]
    views = []
    for inp in k.inputs:
        x = names[inp.index]
        if inp.context == FULL:
            views.append(f"{x}.expand({full})")
        elif inp.context == ROW:
            views.append(f"{x}.expand({row})")
        else:
            views.append(f"{x}.expand({tuple(k.lead)}).unsqueeze(-1)")
    outs = []
    for j, o in enumerate(k.outputs):
        lines.append(f"    o{j} = torch.empty_strided({tuple(o.shape)}, {tuple(o.stride)}, dtype={o.dtype}, device=device)")
        views.append(f"o{j}.unsqueeze(-1)" if o.domain == ROWN else f"o{j}")
        outs.append(f"o{j}")
    lines.append(f"    handle({', '.join(views + scalars)})")
    lines.append(f"    return ({', '.join(outs)},)")
    env = {"torch": torch, "handle": handle, "device": torch.device(device)}
    exec(compile("\n".join(lines), f"<difuse ninetoothed launcher {k.rows}x{k.n_cols}>", "exec"), env)
    return env["launch"]
