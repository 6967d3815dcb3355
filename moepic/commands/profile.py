"""`moepic profile`: measure this machine's hardware profile and write it as YAML.

Side effects: measures the device; `--out` is checked writable before measuring and written whole
or not at all (moepic.outputs), so a failure leaves an older profile intact.
"""

from __future__ import annotations

from moepic.commands import arguments
from moepic.errors import ConfigError
from moepic.outputs import check_writable
from moepic.ranges import HOST_THREADS, LINK_GBPS, LINK_LATENCY_US

NAME = "profile"
HELP = "measure this machine's copy and compute speeds (a hardware profile, with its host CPU)"


def add_parser(subparsers):
    prof = subparsers.add_parser(NAME, help=HELP)
    prof.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    arguments.add_model(prof, shape=False, help="calibrate per-layer overhead on this model's dense decode (default: the built-in model)")
    arguments.add_dtype(prof, "dtype of the calibration model", default="auto")
    prof.add_argument("--name", help="the profile's name (default: measured-DEVICE)")
    prof.add_argument("--out", metavar="FILE.yaml", help="write the profile here")
    prof.add_argument("--quick", action="store_true", help="smaller and fewer measurements (seconds, noisier)")
    prof.add_argument("--link-gbps", type=LINK_GBPS.parse, help="CPU: measure through an emulated link of this many GB/s")
    prof.add_argument("--link-latency-us", type=LINK_LATENCY_US.parse, default=0.0, help="CPU: the emulated link's per-copy latency")
    threads = prof.add_argument("--host-threads", type=HOST_THREADS.parse, metavar="N",
                                help="threads the host CPU's expert rates are measured on")
    threads.shows = "the physical cores less one"
    arguments.add_json(prof)
    arguments.add_progress(prof)
    return prof


def run(args) -> dict:
    import torch
    from moepic.progress import bar as progress_bar

    from moepic.checkpoint.hf_config import DTYPES
    from moepic.checkpoint.load import read_spec
    from moepic.perfmodel.hardware import save_profile
    from moepic.runtime.copy_engine import Link
    from moepic.runtime.measure import measure_profile

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device: not a device: {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here")
    link = None
    if args.link_gbps is not None:
        if dev.type == "cuda":
            raise ConfigError("--link-gbps emulates a link for CPU runs; on CUDA the real link is measured")
        try:
            link = Link(gbps=args.link_gbps, latency_us=args.link_latency_us)
        except ValueError as e:
            raise ConfigError(f"--link-gbps / --link-latency-us: {e}") from None
    if args.out:
        check_writable(args.out, "hardware profile")  # before minutes of measuring, not after
    folder = arguments.weights_folder(args.model, NAME)
    _, cfg = read_spec(folder)
    dtype = cfg.checkpoint_dtype() if args.dtype in (None, "auto") else DTYPES[args.dtype]
    with progress_bar(total=5, desc="profiling", wanted=not args.json, leave=False) as bar:

        def step(what: str) -> None:
            bar.set_description(f"profiling: {what}")
            bar.update(1)

        profile = measure_profile(
            device=device, model_folder=folder, dtype=dtype, quick=args.quick, link=link, name=args.name, progress=step,
            host_threads=args.host_threads,
        )
    if args.out:
        save_profile(profile, args.out)
    return profile.as_dict() | {"written_to": args.out}


def _lines(values: dict, prefix: str = "") -> list[str]:
    lines = []
    for key, value in values.items():
        if isinstance(value, dict):
            lines += _lines(value, f"{prefix}{key}.")
        else:
            lines.append(f"{prefix}{key}: {value:.4g}" if isinstance(value, float) else f"{prefix}{key}: {value}")
    return lines


def text(report: dict) -> str:
    lines = _lines({key: value for key, value in report.items() if key != "written_to"})
    if report["written_to"]:
        lines.append(f"wrote {report['written_to']}: use it with `moepic configure --hardware {report['written_to']}`")
    return "\n".join(lines)
