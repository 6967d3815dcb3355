"""`moepic profile`: measure this machine's hardware profile and write it as YAML.

Side effects: measures the device; `--out` is checked writable before measuring and written whole
or not at all (moepic.outputs), so a failure leaves an older profile intact.
"""

from __future__ import annotations

from moepic.errors import ConfigError
from moepic.outputs import check_writable


def run_profile(args) -> dict:
    import torch
    from moepic.progress import bar as progress_bar

    from moepic.checkpoint.hf_config import DTYPES
    from moepic.checkpoint.load import read_spec
    from moepic.default_model import model_folder
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
    folder = model_folder(args.model)
    _, cfg = read_spec(folder)
    dtype = cfg.checkpoint_dtype() if args.dtype in (None, "auto") else DTYPES[args.dtype]
    with progress_bar(total=3, desc="profiling", wanted=not args.json, leave=False) as bar:

        def step(what: str) -> None:
            bar.set_description(f"profiling: {what}")
            bar.update(1)

        profile = measure_profile(
            device=device, model_folder=folder, dtype=dtype, quick=args.quick, link=link, name=args.name, progress=step
        )
    if args.out:
        save_profile(profile, args.out)
    return profile.as_dict() | {"written_to": args.out}


def profile_text(report: dict) -> str:
    lines = [f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}" for key, value in report.items() if key != "written_to"]
    if report["written_to"]:
        lines.append(f"wrote {report['written_to']}: use it with `moepic configure --hardware {report['written_to']}`")
    return "\n".join(lines)
