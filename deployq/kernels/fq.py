"""Fused fake-quant on the compiled kernel (fakequant.c): the forward and backward of
deployq.quant._fq_forward / _fq_backward in one pass each. Each function returns None
when the kernel does not apply (kernel unavailable or disabled, not contiguous float32
CPU tensors, a scale that is neither per-tensor nor per-channel along axis 0, or grad
mode on, i.e. a double backward that must be traced): the caller then runs its torch
code. Same bits forward; gradients equal up to float rounding (sums in double)."""

from __future__ import annotations

import torch

from deployq.kernels import get

_F32 = torch.float32


def mode_of(z, zero_offset: bool) -> int:
    """The kernels' zero-point mode: 2 a zero-point tensor, 1 a fixed 0 (zero_offset), 0 none."""
    return 2 if z is not None else (1 if zero_offset else 0)


def _dense(t: torch.Tensor) -> bool:
    # is_cpu rather than device.type: this runs ~10 times per fake-quant, ~0.3 us each
    return t.dtype is _F32 and t.is_cpu and t.is_contiguous()


def _channels(x: torch.Tensor, s: torch.Tensor) -> int | None:
    """C when s is per-tensor (1) or per channel along axis 0 of x ([C, 1, ...]); else None."""
    n = s.numel()
    if not _dense(s) or s.dim() > x.dim():
        return None
    if n == 1:
        return 1
    if s.dim() == x.dim() and x.dim() > 0 and s.shape[0] == x.shape[0] == n:
        return n
    return None


def forward(x, s, z, qmin: int, qmax: int, zero_offset: bool):
    """(t, out) as _fq_forward, or None."""
    lib = get()
    if lib is None or not _dense(x) or x.numel() == 0:
        return None
    c = _channels(x, s)
    if c is None:
        return None
    if z is not None and not (_dense(z) and z.numel() == c and (c == 1 or z.shape == s.shape)):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or s.requires_grad or (z is not None and z.requires_grad)):
        return None
    t = torch.empty_like(x)
    out = torch.empty_like(x)
    mode = mode_of(z, zero_offset)
    lib.deployq_fq_forward(
        x.data_ptr(), t.data_ptr(), out.data_ptr(), c, x.numel() // c, s.data_ptr(),
        z.data_ptr() if z is not None else None, mode, float(qmin), float(qmax),
    )
    return t, out


def backward(g, t, out, x, s, z_mask, bounds, grad_factor, need_x: bool, need_s: bool, reuse_g: bool):
    """(gx, gs, gz) as _fq_backward, or None. reuse_g: x's gradient is written into g."""
    if not (need_x or need_s or z_mask is not None):
        return None
    lib = get()
    if lib is None or torch.is_grad_enabled() or not (_dense(g) and _dense(t)) or g.shape != t.shape:
        return None
    c = _channels(t, s)
    if c is None or g.numel() == 0:
        return None
    if need_s and not (_dense(out) and _dense(x) and out.shape == t.shape and x.shape == t.shape):
        return None
    if z_mask is not None and not (_dense(z_mask) and z_mask.shape == s.shape):
        return None
    gx = (g if reuse_g else torch.empty_like(g)) if need_x else None
    gs = torch.empty_like(s) if need_s else None
    gz = torch.empty_like(s) if z_mask is not None else None
    lib.deployq_fq_backward(
        g.data_ptr(), t.data_ptr(),
        out.data_ptr() if need_s else None, x.data_ptr() if need_s else None,
        gx.data_ptr() if gx is not None else None,
        c, g.numel() // c, float(bounds[0]), float(bounds[1]), s.data_ptr(),
        z_mask.data_ptr() if z_mask is not None else None, float(grad_factor),
        gs.data_ptr() if gs is not None else None, gz.data_ptr() if gz is not None else None,
    )
    return gx, gs, gz


def learned_forward(x, raw_s, raw_z, qmin: int, qmax: int, min_scale: float, axis, zero_offset: bool,
                    need_z: bool, relu: bool = False):
    """LearnedFQ.forward's math in one call: (out, scale [shape of raw_s], zq, zmask [shape
    of raw_z] or None), or None when the kernel does not apply. zq: the zero-points the
    forward used ([C], mode 2; else None). The integer grid t is not kept: learned_backward
    recomputes it from x, which is cheaper than writing it and reading it back. relu: x is
    a ReLU's input and relu(x) is quantized (the ReLU's output is never written)."""
    lib = get()
    if lib is None or not (_dense(x) and _dense(raw_s)) or x.numel() == 0:
        return None
    c = raw_s.numel()
    if c > 1 and not (axis == 0 and x.dim() > 0 and x.shape[0] == c):
        return None
    if raw_z is not None and not (_dense(raw_z) and raw_z.numel() == c):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or raw_s.requires_grad):
        return None  # only inside an autograd Function's forward
    bufs = _lfq_outputs(x, raw_s, raw_z, need_z)
    lib.deployq_lfq_forward(
        x.data_ptr(), bufs[0].data_ptr(), c, x.numel() // c,
        *_lfq_args(raw_s, raw_z, qmin, qmax, min_scale, zero_offset, bufs, relu),
    )
    return bufs


def _lfq_outputs(x, raw_s, raw_z, need_z: bool):
    """(out, scale, zq, zmask) for the learned forward kernels to write."""
    zq = torch.empty_like(raw_z) if raw_z is not None else None
    zmask = torch.empty_like(raw_z) if raw_z is not None and need_z else None
    return torch.empty_like(x), torch.empty_like(raw_s), zq, zmask


def _lfq_args(raw_s, raw_z, qmin, qmax, min_scale, zero_offset, bufs, relu: bool) -> tuple:
    """The learned forward kernels' arguments after x / y / out and the sizes."""
    _, scale, zq, zmask = bufs
    return (raw_s.data_ptr(), raw_z.data_ptr() if raw_z is not None else None, mode_of(raw_z, zero_offset),
            float(qmin), float(qmax), float(min_scale), scale.data_ptr(), zq.data_ptr() if zq is not None else None,
            zmask.data_ptr() if zmask is not None else None, int(relu), torch.get_num_threads())


def learned_forward_add(x, y, raw_s, raw_z, qmin: int, qmax: int, min_scale: float, zero_offset: bool,
                        need_z: bool, relu: bool = False):
    """learned_forward for one per-tensor cell with y added to the output (x's other
    operand in a residual add): (out = fake-quant(x) + y, scale, zq, zmask), or None when
    the kernel does not apply. learned_backward is its backward (it reads x only). relu:
    as learned_forward."""
    lib = get()
    if lib is None or not (_dense(x) and _dense(y) and _dense(raw_s)) or x.numel() == 0 or y.shape != x.shape:
        return None
    if raw_s.numel() != 1 or (raw_z is not None and not (_dense(raw_z) and raw_z.numel() == 1)):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or raw_s.requires_grad):
        return None  # only inside an autograd Function's forward
    bufs = _lfq_outputs(x, raw_s, raw_z, need_z)
    lib.deployq_lfq_forward_add(
        x.data_ptr(), y.data_ptr(), bufs[0].data_ptr(), x.numel(),
        *_lfq_args(raw_s, raw_z, qmin, qmax, min_scale, zero_offset, bufs, relu),
    )
    return bufs


def learned_backward(g, x, scale, zq, zmask, qmin: int, qmax: int, zero_offset: bool, grad_factor, raw_s,
                     min_scale: float, need_x: bool, need_s: bool, reuse_g: bool, relu: bool = False):
    """LearnedFQ.backward's math (after learned_forward, x as it had) in one call: (d x,
    d raw_s, d raw_z), or None when the kernel does not apply (e.g. grad mode: a traced
    backward). relu: as the forward had it (t recomputed from relu(x), and d x also takes
    the ReLU's backward)."""
    if torch.is_grad_enabled() or not (_dense(x) and g.shape == x.shape):
        return None
    lib = get()
    if lib is None:
        return None
    if not _dense(g):
        if g.dtype is not _F32 or not g.is_cpu:
            return None
        g = g.contiguous()  # e.g. a mean's expanded gradient: a copy beats the torch path
    c = scale.numel()
    gx = (g if reuse_g else torch.empty_like(g)) if need_x else None
    gs = torch.empty_like(raw_s) if need_s else None
    gz = torch.empty_like(zmask) if zmask is not None else None
    lib.deployq_lfq_backward(
        g.data_ptr(), x.data_ptr(), gx.data_ptr() if gx is not None else None, c, g.numel() // c,
        scale.data_ptr(), zq.data_ptr() if zq is not None else None, mode_of(zq, zero_offset), float(qmin),
        float(qmax), zmask.data_ptr() if zmask is not None else None, float(grad_factor),
        raw_s.data_ptr() if need_s else None, float(min_scale),
        gs.data_ptr() if gs is not None else None, gz.data_ptr() if gz is not None else None,
        int(relu), torch.get_num_threads(),
    )
    return gx, gs, gz


def rows_forward(x, xr: int, r: int, plan, raw_s, raw_z, min_scale: float, need_z: bool, relu: bool = False):
    """Many fake-quants in one call (deployq_rows_forward): x holds xr rows, the output r
    rows of x.numel() // xr floats; plan (deployq.stacked.RowsPlan) maps rows to step-size
    scalars and holds their modes and ranges; raw_s / raw_z: those scalars' raw cells,
    flat. Returns (out [r, k], scale [nc], zq [nc], zmask [nc] or None), or None when the
    kernel is unavailable or the tensors are not dense float32 CPU tensors. zq: the
    zero-points used (0 unless mode 2); rows_backward recomputes t from x. relu: as
    learned_forward."""
    lib = get()
    if lib is None or not (_dense(x) and _dense(raw_s) and _dense(raw_z)) or x.numel() == 0:
        return None
    k = x.numel() // xr
    out = torch.empty(r, k)
    scale = torch.empty_like(raw_s)
    zq = torch.empty_like(raw_s)
    zmask = torch.empty_like(raw_s) if need_z else None
    cell_of, mode, qmin, qmax, _ = plan.ptrs
    lib.deployq_rows_forward(
        x.data_ptr(), xr, out.data_ptr(), r, k, cell_of, plan.nc, raw_s.data_ptr(), raw_z.data_ptr(), mode, qmin,
        qmax, min_scale, scale.data_ptr(), zq.data_ptr(), zmask.data_ptr() if zmask is not None else None,
        int(relu),
    )
    return out, scale, zq, zmask


def rows_backward(g, x, xr: int, plan, scale, zq, zmask, raw_s, min_scale: float, need_x: bool, need_s: bool,
                  gx=None, relu: bool = False):
    """The backward of rows_forward (x as it had): (d rows [r, k] or None, d raw_s, d raw_z
    or None). gx: where to write the rows' gradient (may be g; default a new tensor).
    relu: as learned_backward."""
    lib = get()
    r = plan.cell_of.numel()
    k = x.numel() // xr
    g = g.reshape(r, k)
    if not _dense(g):
        g = g.contiguous()
    if need_x and gx is None:
        gx = torch.empty_like(g)
    gs = torch.empty_like(raw_s) if need_s else None
    gz = torch.empty_like(raw_s) if zmask is not None else None
    acc = torch.empty(2 * plan.nc, dtype=torch.float64)
    cell_of, mode, qmin, qmax, gf = plan.ptrs
    lib.deployq_rows_backward(
        g.data_ptr(), x.data_ptr(), xr, gx.data_ptr() if need_x else None, r, k, cell_of, plan.nc, mode, qmin, qmax,
        scale.data_ptr(), zq.data_ptr(), zmask.data_ptr() if zmask is not None else None, gf, raw_s.data_ptr(),
        min_scale, acc.data_ptr(), gs.data_ptr() if gs is not None else None,
        gz.data_ptr() if gz is not None else None, int(relu),
    )
    return (gx if need_x else None), gs, gz
