"""`deployq export CKPT --profile NAME (--bits B | --wbits B --abits B | --config subnet.json)`
and `deployq export CKPT --fp32`: write a subnet as QDQ ONNX (or the float reference)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deployq.errors import UserError


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_cmd(
        ckpt: Annotated[Path, typer.Argument(help="Supernet checkpoint (.pt) written by deployq train.")],
        profile: Annotated[
            str | None, typer.Option("--profile", "-p", help="Target profile name or .toml path.")
        ] = None,
        bits: Annotated[int | None, typer.Option("--bits", help="Uniform weight and activation bits.")] = None,
        wbits: Annotated[int | None, typer.Option("--wbits", help="Uniform weight bits (with --abits).")] = None,
        abits: Annotated[int | None, typer.Option("--abits", help="Uniform activation bits (with --wbits).")] = None,
        config: Annotated[
            Path | None, typer.Option("--config", help="Per-layer SubnetSpec JSON (from deployq search).")
        ] = None,
        out: Annotated[Path | None, typer.Option("--output", "-o", help="Output .onnx path.")] = None,
        fp32: Annotated[bool, typer.Option("--fp32", help="Export the float reference graph instead.")] = False,
        calib_data: Annotated[
            str | None,
            typer.Option(
                "--calib-data",
                help="Data source (digits, folder, .npz) to range the quantized logits for targets "
                "that quantize the model output (QNN). Default: a range computed from the weights.",
            ),
        ] = None,
    ) -> None:
        """Export a subnet as QDQ ONNX for a target profile (or --fp32 for the float graph)."""
        from deployq.checkpoint import load_checkpoint
        from deployq.export import default_output_name, export, subnet_from_args, summary
        from deployq.fileio import check_writable
        from deployq.profile import load_profile

        if fp32:
            if any(v is not None for v in (bits, wbits, abits, config)):
                raise UserError("--fp32 exports the float graph: drop --bits/--wbits/--abits/--config")
            prof = load_profile(profile) if profile is not None else None
        else:
            if profile is None:
                raise UserError("choose a target with --profile NAME (or --fp32 for the float graph)")
            prof = load_profile(profile)
        if out is not None:
            check_writable(out)  # refuse a missing directory before loading anything
        ck = load_checkpoint(ckpt)
        spec = None if fp32 else subnet_from_args(ck.net, prof, bits, wbits, abits, config)
        if not fp32:
            prof.check(spec)
            ck.net.check_spec(spec)
        target = out if out is not None else default_output_name(ckpt, None if fp32 else prof, spec)
        calibration = None
        if calib_data is not None and not fp32:
            from deployq.data import Preprocessing, load_data

            pre = Preprocessing.from_dict(ck.meta.preprocessing)
            calibration = load_data(calib_data, pre, split="train").x[:512]
        result = export(ck, prof, spec, target, fp32=fp32, calibration=calibration)
        typer.echo(summary(result))
