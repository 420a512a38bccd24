"""Static facts about a supernet that the search needs, computed once per net.

A `NetLayout` lists the quantized layers in graph order with what the cost models
need (weight and bias element counts, MACs per image from a shape-recording forward
pass) and which layers the search may change (fixed first/last layers are pinned by
the checkpoint's elastic space). It is plain data, so the encoder and the cost
functions stay pure functions of (layout, spec).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class LayerInfo:
    name: str
    weighted: bool  # False for residual-add quantizers (activation only)
    fixed: bool  # pinned to the space's fixed_bits (first / last weighted layer)
    weight_numel: int
    bias_numel: int
    macs: int  # multiply-accumulates per image (0 for adds)


@dataclass(frozen=True)
class NetLayout:
    layers: tuple[LayerInfo, ...]
    wbits: tuple[int, ...]  # the supernet space (encoder one-hot width)
    abits: tuple[int, ...]
    fixed_bits: int | None
    input_shape: tuple[int, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(li.name for li in self.layers)

    @property
    def searchable(self) -> tuple[LayerInfo, ...]:
        return tuple(li for li in self.layers if not li.fixed)

    def fingerprint(self) -> str:
        """Identifies the layout (cache key): any change of layers or space changes it."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @classmethod
    def of(cls, net, input_shape: tuple[int, ...]) -> NetLayout:
        """Record every weighted layer's output shape in one float forward pass (batch 1)."""
        from deployq.elastic import ElasticWeightless

        macs: dict[str, int] = {}
        hooks = []
        for name, m in net.layers():
            if isinstance(m, ElasticWeightless):
                continue

            def hook(mod, _args, out, name=name):
                # One MAC per element of the filter behind each output element; the
                # filter is weight[o] ([in/groups, kh, kw] or [in]), so groups are covered.
                macs[name] = int(out[0].numel()) * int(mod.weight[0].numel())

            hooks.append(m.register_forward_hook(hook))
        previous = net.active_spec()
        net.set_active(None)
        try:
            with torch.no_grad():  # not inference_mode: see sampling.Measurer
                net(torch.zeros((1, *input_shape[1:])))
        finally:
            for h in hooks:
                h.remove()
            net.set_active(previous)
        infos = []
        for name, m in net.layers():
            weighted = not isinstance(m, ElasticWeightless)
            infos.append(
                LayerInfo(
                    name=name,
                    weighted=weighted,
                    fixed=name in net.fixed_layers,
                    weight_numel=int(m.weight.numel()) if weighted else 0,
                    bias_numel=int(m.bias.numel()) if weighted else 0,
                    macs=macs.get(name, 0),
                )
            )
        return cls(
            layers=tuple(infos),
            wbits=tuple(net.space.wbits),
            abits=tuple(net.space.abits),
            fixed_bits=net.space.fixed_bits,
            input_shape=tuple(int(s) for s in input_shape),
        )
