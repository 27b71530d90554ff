"""The ``liteattention`` command line: demo, coherence, bench, info."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from .experiment import RunConfig

Config = TypeVar("Config")
# Options whose absence means the config's default (bench's options default by mode: kernel or model).
_DEFAULTED = ("prompts", "resolution", "sparsities", "patterns", "rounds", "warmup_steps", "device", "dtype", "modes")
_KERNEL_BENCH_ONLY = ("shapes", "no_flex")
_MODEL_BENCH_ONLY = ("resolution", "warmup_steps", "device", "dtype", "modes")


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="liteattention", description=__doc__)
    parser.add_argument("--version", action="version", version=f"liteattention {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, GPU, and which kernel each head dim and tile shape gets, and why")
    info.set_defaults(command_parser=info)

    _add_bench_parser(sub)
    _add_demo_parser(sub)
    _add_coherence_parser(sub)
    _add_calibrate_parser(sub)
    return parser


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    from .bench import PATTERNS, ROUNDS, SHAPES, SPARSITIES
    from .commands.model_bench import DEFAULT_SPARSITIES, ModelBenchConfig
    from .models.wan import LATENT_SIZES, WAN_MODELS

    d = ModelBenchConfig.__dataclass_fields__
    bench = sub.add_parser(
        "bench", help="GPU benchmark: the attention kernel vs cuDNN/flash SDPA and FlexAttention (--shapes), "
                      "or one denoising step of a Wan2.1 model with diffusers' attention and LiteAttention (--model)",
    )
    bench.set_defaults(command_parser=bench)
    kernel = bench.add_argument_group("kernel benchmark (without --model)")
    kernel.add_argument("--shapes", type=_names, default=None, help=f"comma-separated, from {','.join(SHAPES)} (default: all)")
    kernel.add_argument("--no-flex", action="store_true", help="skip FlexAttention (saves its compile time)")
    model = bench.add_argument_group("model benchmark (--model): random weights, sparsity injected")
    model.add_argument("--model", default=None, help=f"one of {', '.join(WAN_MODELS)} (tiny: for the CPU)")
    model.add_argument("--resolution", default=None, help=f"one of {', '.join(LATENT_SIZES)} (default: {d['resolution'].default})")
    model.add_argument("--warmup-steps", type=int, default=None,
                       help=f"untimed steps per configuration before the timed rounds (default: {d['warmup_steps'].default})")
    model.add_argument("--device", default=None, help=f"auto, cpu, cuda or cuda:N (default: {d['device'].default})")
    model.add_argument("--dtype", default=None, help="auto (bfloat16 on CUDA, float32 elsewhere), float32, float16, bfloat16")
    model.add_argument("--modes", type=_names, default=None,
                       help=f"LiteAttention modes to time, lite first (default: {','.join(d['modes'].default)}; "
                            "lite-8bit needs an Ada or Hopper GPU)")
    both = bench.add_argument_group("both")
    both.add_argument("--sparsities", type=_floats, default=None,
                      help=f"comma-separated skipped fractions (default: {','.join(map(str, SPARSITIES))}; "
                           f"with --model {','.join(map(str, DEFAULT_SPARSITIES))})")
    both.add_argument("--patterns", type=_names, default=None,
                      help=f"comma-separated mask patterns, from {','.join(PATTERNS)} (default: all; with --model random)")
    both.add_argument("--rounds", type=int, default=None,
                      help=f"interleaved timing rounds; times are medians over them (default: {ROUNDS}; "
                           f"with --model {d['rounds'].default}, one step per configuration each)")
    both.add_argument("--out", type=Path, default=Path("bench-results"), help="output folder (default: %(default)s)")


def _add_run_options(parser: argparse.ArgumentParser, defaults: RunConfig) -> None:
    """Options shared by the commands that sample one video from the demo model (RunConfig)."""
    parser.add_argument("--prompt", default=defaults.prompt, help="default: %(default)r")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="denoising steps (default: %(default)s)")
    parser.add_argument("--guidance-scale", type=float, default=defaults.guidance_scale, help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="noise seed (default: %(default)s)")
    parser.add_argument("--device", default=defaults.device, help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument(
        "--dtype", default=defaults.dtype, help="auto (bfloat16 on CUDA, float32 elsewhere), float32, float16, bfloat16"
    )
    tiles = "16, 32, 64 or 128 (default: %(default)s)"
    parser.add_argument("--block-m", type=int, default=defaults.block_m, help=f"q-tile rows: {tiles}")
    parser.add_argument("--block-n", type=int, default=defaults.block_n, help=f"k-tile columns: {tiles}")
    parser.add_argument(
        "--weights", type=Path, default=None,
        help="folder with demo_model.safetensors and config.json (default: the bundled weights)",
    )
    parser.add_argument("--out", type=Path, default=defaults.out, help="output folder (default: %(default)s)")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads (default: 1 on the CPU, torch's default with CUDA)"
    )


def _add_sampling_parser(sub: argparse._SubParsersAction, name: str, help: str, defaults: RunConfig) -> argparse.ArgumentParser:
    """A subcommand that samples one video from the demo model, with the shared RunConfig options."""
    parser = sub.add_parser(name, help=help)
    parser.set_defaults(command_parser=parser)
    _add_run_options(parser, defaults)
    return parser


def _add_demo_parser(sub: argparse._SubParsersAction) -> None:
    from .experiment import DemoConfig

    defaults = DemoConfig()
    demo = _add_sampling_parser(sub, "demo", "sample a video densely and with LiteAttention on the bundled model; compare", defaults)
    demo.add_argument(
        "--threshold", type=float, default=defaults.threshold,
        help="marking threshold, log2 units (default: %(default)s); write --threshold=-inf for dense",
    )
    demo.add_argument(
        "--warmup-steps", type=int, default=None,  # DemoConfig scales its default to --steps
        help="first steps run with threshold -inf (default: 4, at most a fifth of the steps)",
    )
    demo.add_argument(
        "--timing-rounds", type=int, default=defaults.timing_rounds,
        help="rounds of both runs, in alternating order, that the times are averaged over (default: %(default)s)",
    )
    demo.add_argument(
        "--profile", type=Path, default=None,
        help="calibrated profile (.json/.toml, from liteattention calibrate): replaces --threshold and --warmup-steps",
    )
    demo.add_argument(
        "--quant", default=None,
        help="the LiteAttention run in the 8-bit path, qk_int8_pv_fp8 (the dense run stays 16-bit)",
    )


def _add_coherence_parser(sub: argparse._SubParsersAction) -> None:
    from .experiment import CoherenceConfig

    defaults = CoherenceConfig()
    coherence = _add_sampling_parser(sub, "coherence", "measure how long negligible attention tiles stay negligible", defaults)
    coherence.add_argument(
        "--thresholds", type=_floats, default=list(defaults.thresholds),
        help="comma-separated, log2 units; write --thresholds=-6,-10 (default: %(default)s)",
    )


def _add_calibrate_parser(sub: argparse._SubParsersAction) -> None:
    from .commands.calibrate import CalibrateConfig

    d = CalibrateConfig.__dataclass_fields__
    calibrate = sub.add_parser("calibrate", help="calibrate thresholds per step and layer for a quality budget (demo model)")
    calibrate.set_defaults(command_parser=calibrate)
    calibrate.add_argument("--prompt", dest="prompts", action="append", default=None,
                           help=f"calibration prompt, repeatable (default: {list(d['prompts'].default)})")
    calibrate.add_argument("--seeds", type=_ints, default=list(d["seeds"].default), help="comma-separated (default: %(default)s)")
    calibrate.add_argument("--steps", type=int, default=d["steps"].default, help="denoising steps (default: %(default)s)")
    calibrate.add_argument("--guidance-scale", type=float, default=d["guidance_scale"].default, help="default: %(default)s")
    calibrate.add_argument("--metric", default=d["metric"].default, help="per-call error: rel_l2, cosine or l1 (default: %(default)s)")
    calibrate.add_argument("--max-error", type=float, default=None, help="bound on every attention call's error (metric units)")
    calibrate.add_argument("--psnr", type=float, default=None, help="bound on each calibration video's PSNR vs dense (dB)")
    calibrate.add_argument("--sparsity", type=float, default=None, help="mean fraction of tiles to skip, e.g. 0.3")
    calibrate.add_argument("--max-trials", type=int, default=d["max_trials"].default,
                           help="generations per search phase (default: %(default)s)")
    calibrate.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    calibrate.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 elsewhere), float32, float16, bfloat16")
    calibrate.add_argument("--block-m", type=int, default=d["block_m"].default, help="q-tile rows (default: %(default)s)")
    calibrate.add_argument("--block-n", type=int, default=d["block_n"].default, help="k-tile columns (default: %(default)s)")
    calibrate.add_argument("--weights", type=Path, default=None, help="demo model folder (default: the bundled weights)")
    calibrate.add_argument("--format", default=d["format"].default, help="profile file: json or toml (default: %(default)s)")
    calibrate.add_argument("--out", type=Path, default=d["out"].default, help="output folder (default: %(default)s)")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _config(parser: argparse.ArgumentParser, config_type: type[Config], args: argparse.Namespace) -> Config:
    """``config_type`` from the parsed options of the same names; a bad value is a usage error."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_type) if hasattr(args, f.name)}
    for name in ("thresholds", "prompts", "seeds"):
        if name in values and values[name] is not None:
            values[name] = tuple(values[name])
    values = {name: value for name, value in values.items() if value is not None or name not in _DEFAULTED}
    try:
        return config_type(**values)
    except ValueError as error:  # the message names the option
        parser.error(str(error))


def _make_out_folder(parser: argparse.ArgumentParser, out: Path) -> None:
    """Create the output folder and check that it takes files: a bad --out is a usage error now,
    not a traceback after the whole run."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as error:
        reason = "a file of that name exists" if isinstance(error, FileExistsError) else error.strerror or error
        parser.error(f"--out: cannot write into the folder {str(out)!r} ({reason})")


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with _current_device(getattr(args, "device", None)):
        _run(args)


@contextlib.contextmanager
def _current_device(name: str | None) -> Iterator[None]:
    """--device cuda:N made current for the command: CUDA events and synchronizes act on the
    current device. Bad names are left to the command, which rejects them naming the option."""
    if not (name or "").startswith("cuda:"):
        yield
        return
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or not torch.cuda.is_available() or not 0 <= device.index < torch.cuda.device_count():
        yield
        return
    with torch.cuda.device(device):
        yield


def _run(args: argparse.Namespace) -> None:
    if args.command == "info":
        from .info import main as info

        info()
    elif args.command == "bench":
        if args.model is None:
            _run_kernel_bench(args)
        else:
            _run_model_bench(args)
    elif args.command in ("demo", "coherence"):
        _run_sampling_command(args)
    elif args.command == "calibrate":
        from .commands.calibrate import CalibrateConfig, main as calibrate

        config = _config(args.command_parser, CalibrateConfig, args)
        try:
            calibrate(config)
        except FileNotFoundError as error:  # no demo model weights
            sys.exit(f"liteattention calibrate: {error}")


def _reject_options(args: argparse.Namespace, names: Sequence[str], reason: str) -> None:
    for name in names:
        if getattr(args, name) not in (None, False):
            args.command_parser.error(f"--{name.replace('_', '-')}: {reason}")


def _run_kernel_bench(args: argparse.Namespace) -> None:
    from .bench import PATTERNS, ROUNDS, SHAPES, SPARSITIES, check_bench_args, run_bench

    _reject_options(args, _MODEL_BENCH_ONLY, "an option of the model benchmark; add --model")
    shapes = list(SHAPES) if args.shapes is None else args.shapes
    sparsities = list(SPARSITIES) if args.sparsities is None else args.sparsities
    patterns = list(PATTERNS) if args.patterns is None else args.patterns
    rounds = ROUNDS if args.rounds is None else args.rounds
    try:
        check_bench_args(shapes, sparsities, patterns, rounds)
    except ValueError as error:  # the message names the option
        args.command_parser.error(str(error))
    import torch

    if not torch.cuda.is_available():
        sys.exit("liteattention bench: the benchmark needs a CUDA GPU")
    _make_out_folder(args.command_parser, args.out)
    run_bench(shapes, sparsities, patterns, out=args.out, flex=not args.no_flex, rounds=rounds)


def _run_model_bench(args: argparse.Namespace) -> None:
    from .commands.model_bench import ModelBenchConfig, main as model_bench

    _reject_options(args, _KERNEL_BENCH_ONLY, "an option of the kernel benchmark; drop it with --model")
    config = _config(args.command_parser, ModelBenchConfig, args)
    if importlib.util.find_spec("diffusers") is None:
        sys.exit("liteattention bench --model needs diffusers, which the diffusers extra installs: "
                 "pip install 'liteattention[diffusers]'")
    _make_out_folder(args.command_parser, config.out)
    model_bench(config)


def _run_sampling_command(args: argparse.Namespace) -> None:
    from .experiment import CoherenceConfig, DemoConfig

    try:
        if args.command == "demo":
            from .demo import main as command

            config_type = DemoConfig
        else:
            from .coherence import main as command

            config_type = CoherenceConfig
    except ModuleNotFoundError as error:  # the operator alone was installed
        package = (error.name or "a package").split(".")[0]
        sys.exit(f"liteattention {args.command} needs {package}, which the demo extra installs: pip install 'liteattention[demo]'")
    config = _config(args.command_parser, config_type, args)
    _make_out_folder(args.command_parser, config.out)
    try:
        command(config)
    except FileNotFoundError as error:  # no demo model weights
        sys.exit(f"liteattention {args.command}: {error}")


if __name__ == "__main__":
    main()
