"""`deployq train` and `deployq eval`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deployq.errors import UserError
from deployq.spec import MAX_BITS, MIN_BITS, check_bits


def parse_bits(text: str, what: str) -> tuple[int, ...]:
    """Parse "2-8" (a range) or "2,4,8" (a list) into sorted unique bit-widths in 2..8."""
    text = text.strip()
    try:
        if "-" in text:
            lo, hi = (int(t) for t in text.split("-", 1))
            if lo > hi:
                raise UserError(f"--{what} range {text!r} is empty")
            bits = tuple(range(lo, hi + 1))
        else:
            bits = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise UserError(
            f"--{what} must be a range like 2-8 or a list like 2,4,8; got {text!r}"
        ) from None
    if not bits:
        raise UserError(f"--{what} is empty")
    for b in bits:
        check_bits(b, f"--{what}")
    return tuple(sorted(set(bits)))


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(
        model: Annotated[
            str, typer.Option(help="Model from the zoo: resnet20, resnet18, mobilenetv2.")
        ] = "resnet20",
        data: Annotated[
            str, typer.Option(help="digits (built in), an ImageFolder directory or an .npz (x, y).")
        ] = "digits",
        out: Annotated[
            Path, typer.Option(help="Checkpoint to write (atomically, every epoch).")
        ] = Path("ckpt.pt"),
        epochs: Annotated[int, typer.Option(help="Supernet epochs (after the FP32 warm-up).")] = 120,
        batch_size: Annotated[int, typer.Option(help="Batch size per process.")] = 64,
        lr: Annotated[
            float, typer.Option(help="Adam learning rate of the (BN-folded) weights.")
        ] = 1e-3,
        lr_quant: Annotated[
            float,
            typer.Option(help="Relative Adam step of the step sizes (fraction of their value)."),
        ] = 1e-2,
        input_size: Annotated[
            int | None, typer.Option(help="Input side in pixels (default: the data's; digits: 16).")
        ] = None,
        width: Annotated[
            int | None,
            typer.Option(help="Base width of the model (default: the model's, 16 for resnet20)."),
        ] = None,
        wbits: Annotated[
            str, typer.Option(help="Weight bit-widths of the space: range 2-8 or list 2,4,8.")
        ] = "2-8",
        abits: Annotated[str, typer.Option(help="Activation bit-widths of the space.")] = "2-8",
        fixed_bits: Annotated[
            int,
            typer.Option(help="Bit-width of the first and last layer and of the residual stream."),
        ] = 8,
        no_fixed: Annotated[
            bool,
            typer.Option(
                "--no-fixed", help="Make the first/last layer and the residual stream elastic too."
            ),
        ] = False,
        no_wdr: Annotated[
            bool, typer.Option("--no-wdr", help="Ablation: no weight-distribution regularisation.")
        ] = False,
        no_gpg: Annotated[
            bool,
            typer.Option(
                "--no-gpg", help="Ablation: every sandwich subnet on plain CE (no KL chaining)."
            ),
        ] = False,
        distill: Annotated[
            bool,
            typer.Option(
                "--distill",
                help="The highest subnet also learns from the FP32 model's logits (needs --pretrained or a warm-up).",
            ),
        ] = False,
        grad_l1: Annotated[
            float, typer.Option("--grad-l1", help="Gradient-l1 lambda on weights (0 = off).")
        ] = 0.0,
        grad_l1_act: Annotated[
            float, typer.Option("--grad-l1-act", help="Gradient-l1 lambda on activations.")
        ] = 0.0,
        grad_l1_last: Annotated[
            int,
            typer.Option(
                "--grad-l1-last", help="Apply gradient-l1 only in the last N epochs (0 = all)."
            ),
        ] = 0,
        pretrained: Annotated[
            Path | None,
            typer.Option(help="A plain FP32 state_dict of the model: skips the warm-up."),
        ] = None,
        lowest_bits_pool: Annotated[
            int,
            typer.Option(
                help="The sandwich's lowest subnet draws its bit-width from the space's N lowest "
                "(1: always the lowest, as EQ-Net)."
            ),
        ] = 2,
        middle_uniform: Annotated[
            float,
            typer.Option(
                help="Probability that the sandwich's random subnet is the uniform one at the "
                "bit-width just above the lowest subnet's pool (with --lowest-bits-pool 1: 3 bits)."
            ),
        ] = 0.0,
        lowest_teacher: Annotated[
            str,
            typer.Option(
                help="The lowest subnet's GPG teacher: highest (the sandwich's first subnet) or "
                "random (the one before it, EQ-Net's chain)."
            ),
        ] = "random",
        lowest_forms: Annotated[
            int,
            typer.Option(
                help="Forms the lowest subnet runs in each step, each on an equal share of the batch "
                "(per-tensor and per-channel alternating; 1: one form on the whole batch)."
            ),
        ] = 1,
        lowest_weight: Annotated[
            float,
            typer.Option(
                help="GPG's weight on the lowest subnet's term of the sandwich loss (1: the plain "
                "sum, as EQ-Net; 2 trains the 2-bit subnets closer to dedicated 2-bit QAT)."
            ),
        ] = 2.0,
        lr_ramp_epochs: Annotated[
            float,
            typer.Option(
                help="Ramp the supernet learning rates up linearly over this many epochs "
                "(0 = none; helps MobileNetV2)."
            ),
        ] = 0.0,
        warmup_epochs: Annotated[
            int, typer.Option(help="FP32 warm-up epochs (without --pretrained).")
        ] = 80,
        warmup_lr: Annotated[
            float, typer.Option(help="SGD learning rate of the FP32 warm-up.")
        ] = 0.05,
        calibration: Annotated[
            str,
            typer.Option(
                help="Cell initialisation: search (EQ-Net clipping search), minmax or hybrid."
            ),
        ] = "search",
        seed: Annotated[int, typer.Option()] = 0,
        resume: Annotated[
            bool, typer.Option("--resume", help="Continue from --out after a kill (same settings).")
        ] = False,
        holdout: Annotated[
            float, typer.Option(help="Fraction of the train split held out for per-epoch metrics.")
        ] = 0.1,
        no_augment: Annotated[
            bool, typer.Option("--no-augment", help="No random-shift augmentation.")
        ] = False,
        threads: Annotated[
            int | None,
            typer.Option(
                help="torch threads per process (1 is often fastest for small nets on a busy CPU)."
            ),
        ] = None,
        stacked: Annotated[
            str,
            typer.Option(
                help="Run the sandwich's three subnets as one stacked batch: auto (where it is "
                "faster: small activations, CPU, compiled kernel), on, off."
            ),
        ] = "auto",
    ) -> None:
        """Train an elastic quantization supernet (FP32 warm-up, BN folding, GPG sandwich + WDR).

        The defaults train ResNet-20 (width 16) on the built-in digits at 16x16: 80 FP32
        epochs then 120 supernet epochs, about 8 minutes on 2 CPU cores. Runs unchanged under
        `torchrun --nproc_per_node N` (DistributedDataParallel).
        """
        from deployq.train import TrainConfig, train

        cfg = TrainConfig(
            model=model,
            data=data,
            out=str(out),
            epochs=epochs,
            batch_size=batch_size,
            lr_weights=lr,
            lr_quant=lr_quant,
            lr_ramp_epochs=lr_ramp_epochs,
            warmup_epochs=warmup_epochs,
            warmup_lr=warmup_lr,
            input_size=input_size,
            width=width,
            wbits=parse_bits(wbits, "wbits"),
            abits=parse_bits(abits, "abits"),
            fixed_bits=None if no_fixed else check_bits(fixed_bits, "--fixed-bits"),
            wdr=not no_wdr,
            gpg=not no_gpg,
            distill=distill,
            lowest_bits_pool=lowest_bits_pool,
            middle_uniform=middle_uniform,
            lowest_teacher=lowest_teacher,
            lowest_forms=lowest_forms,
            lowest_weight=lowest_weight,
            grad_l1_w=grad_l1,
            grad_l1_a=grad_l1_act,
            grad_l1_last=grad_l1_last,
            pretrained=str(pretrained) if pretrained else None,
            seed=seed,
            calibration=calibration,
            resume=resume,
            holdout=holdout,
            augment=not no_augment,
            threads=threads,
            stacked=stacked,
        )
        train(cfg, progress=True)

    @app.command("eval")
    def eval_cmd(
        checkpoint: Annotated[
            Path, typer.Argument(help="A supernet checkpoint from `deployq train`.")
        ],
        wbits: Annotated[int, typer.Option(help=f"Weight bits ({MIN_BITS}..{MAX_BITS}).")] = 8,
        abits: Annotated[
            int | None, typer.Option(help="Activation bits (default: --wbits).")
        ] = None,
        granularity: Annotated[
            str, typer.Option(help="Weight granularity: per-tensor or per-channel.")
        ] = "per-channel",
        symmetric: Annotated[
            bool, typer.Option("--symmetric/--asymmetric", help="Weight symmetry.")
        ] = True,
        act_symmetric: Annotated[
            bool, typer.Option("--act-symmetric/--act-asymmetric", help="Activation symmetry.")
        ] = False,
        act_signed: Annotated[
            bool,
            typer.Option(
                "--act-signed/--act-unsigned", help="Symmetric activations: signed (int8) grid."
            ),
        ] = False,
        config: Annotated[
            Path | None, typer.Option(help="A SubnetSpec JSON (overrides the bit/form options).")
        ] = None,
        data: Annotated[
            str | None, typer.Option(help="Data source (default: the one it was trained on).")
        ] = None,
        split: Annotated[str, typer.Option(help="train, val or all.")] = "val",
        fp32: Annotated[
            bool, typer.Option("--fp32", help="Evaluate the float (BN-folded) network instead.")
        ] = False,
        batch_size: Annotated[int, typer.Option()] = 256,
    ) -> None:
        """Print the top-1 accuracy of one subnet of a supernet checkpoint, in PyTorch."""
        from deployq.checkpoint import load_checkpoint
        from deployq.data import Preprocessing, load_data
        from deployq.evaluate import evaluate, form_label
        from deployq.spec import GRANULARITIES, Form, SubnetSpec

        if granularity not in GRANULARITIES:
            raise UserError(
                f"--granularity must be one of {', '.join(GRANULARITIES)}; got {granularity!r}"
            )
        check_bits(wbits, "--wbits")
        abits = check_bits(abits, "--abits") if abits is not None else wbits
        spec_json = None
        if config is not None:
            if not config.is_file():
                raise UserError(f"subnet config {str(config)!r} does not exist")
            spec_json = SubnetSpec.from_json(config.read_text())
        ckpt = load_checkpoint(checkpoint)
        net, meta = ckpt.net, ckpt.meta
        source = data or meta.train_config.get("data")
        if not source:
            raise UserError("the checkpoint does not record its data source: pass --data")
        pre = Preprocessing.from_dict(meta.preprocessing)
        ds = load_data(source, pre, split=split)
        if tuple(ds.class_names) != tuple(meta.class_names):
            raise UserError(
                f"the classes of {source!r} ({len(ds.class_names)}) differ from the checkpoint's "
                f"({len(meta.class_names)}): {list(ds.class_names)[:5]} vs {list(meta.class_names)[:5]}"
            )
        if fp32:
            spec, label = None, "float (BN folded)"
        elif spec_json is not None:
            spec, label = spec_json, f"subnet {config}"
        else:
            form = Form(
                weight_per_channel=granularity == "per-channel",
                weight_symmetric=symmetric,
                act_symmetric=act_symmetric,
                act_signed=act_signed,
            )
            spec = net.uniform_spec(form, wbits, abits)
            label = f"w{wbits}a{abits} {form_label(form)}"
        if spec is not None:
            net.check_spec(spec)
        acc = evaluate(net, ds, spec, batch_size)
        n = len(ds)
        print(f"top-1 {100 * acc:.2f}% ({round(acc * n)}/{n})  {label}  on {source} [{split}]")
