"""`inferline calibrate`: profiles rewritten from the service times a running pipeline's router measured."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from inferline.calibration import (
    Calibration,
    calibrate_profiles,
    hypervisor_took,
    live_stages,
    read_metrics,
    stolen_share,
)
from inferline.errors import InferlineError
from inferline.output_paths import check_creatable_dir
from inferline.plan import load_plan
from inferline.profiles import load_profiles, require_profiles, write_profile
from inferline.spec import load_spec
from inferline.validation import check_cores


def metrics_source(args: argparse.Namespace) -> tuple[str, float | None]:
    """Where the router's metrics are, and the cores its replicas shared (`--cores`, else a local `up`'s)."""
    check_cores(args.cores)
    if args.metrics:
        return str(args.metrics), args.cores
    from inferline.serve_command import read_up

    up = read_up(args.state_dir)
    return str(up["endpoints"]["metrics"]), args.cores if args.cores is not None else up.get("cores")


def run_calibrate(args: argparse.Namespace, console: Console) -> int:
    plan = load_plan(args.plan)
    if plan.spec is None:
        raise InferlineError(f"plan {args.plan!r} does not name its spec", "make it with `inferline plan`")
    source_dir = args.profiles or plan.profiles
    if source_dir is None:
        raise InferlineError(f"plan {args.plan!r} does not say where its profiles are", "pass --profiles DIR")
    if Path(args.out).resolve() == Path(source_dir).resolve():
        raise InferlineError(
            f"--out {args.out!r} is the profile directory itself", "write calibrated profiles to a new directory"
        )
    check_creatable_dir(args.out, "--out folder")
    if args.min_calls < 1:
        raise InferlineError(f"--min-calls must be at least 1, got {args.min_calls}", "pass a positive count")
    if args.max_stolen is not None and not 0 <= args.max_stolen < 1:
        raise InferlineError(f"--max-stolen must be a fraction from 0 to 1, got {args.max_stolen:g}", "e.g. 0.02")
    spec = load_spec(plan.spec)
    profiles = load_profiles(source_dir)
    require_profiles(sorted({s.model for s in spec.stages}), profiles)
    source, cores = metrics_source(args)
    since = read_metrics(args.since) if args.since else None
    text = read_metrics(source)
    live = live_stages(text, since=since)
    stolen = stolen_share(text, since=since)
    if stolen is not None and args.max_stolen is not None and stolen > args.max_stolen:
        raise InferlineError(
            f"the hypervisor gave {stolen:.1%} of this machine's CPU to others while these calls were measured "
            f"(--max-stolen {args.max_stolen:g}): no profile written",
            "replay again when the machine is quieter, and calibrate from that replay (--since)",
        )
    calibrated, done = calibrate_profiles(spec, plan, profiles, live, args.min_calls, cores)
    if all(c.ratio is None for c in done):
        raise InferlineError(
            f"the router's metrics hold fewer than {args.min_calls} calls for every stage of {plan.pipeline!r}",
            "replay traffic through the pipeline first (`inferline replay`), then calibrate",
        )
    for profile in calibrated.values():
        write_profile(profile, args.out)
    console.print(calibration_table(done))
    if cores is not None:
        console.print(interference_line(done, cores))
    slowed = hypervisor_took(stolen, "while these calls were measured")
    if slowed is not None:
        console.print(
            f"[yellow]{slowed}: the calibrated profiles carry that slowness into every estimate from them. Unless "
            "that is usual for this machine, replay again and calibrate from a quieter replay (--since).[/yellow]"
        )
    console.print(f"calibrated profiles written to {args.out}; plan with `inferline plan --profiles {args.out}`")
    return 0


def interference_line(done: tuple[Calibration, ...], cores: float) -> str:
    """How much calls beside them slowed each model's calls on the shared cores, as fitted."""
    fitted = [(c.model, c.interference_fit) for c in done if c.interference_fit is not None]
    if not fitted:
        return f"shared cores: {cores:g} (the calls did not crowd enough to tell how much they slowed each other)"
    each = "; ".join(
        f"{model} +{fit.interference:.0%} (spread {fit.error:.1%}, {fit.error_without:.1%} without)"
        for model, fit in fitted
    )
    return (
        f"shared cores: {cores:g}; per core's worth of calls computing beside them, a call took longer by: {each}. "
        "Recorded in the profiles as their interference, which estimates on shared cores use"
    )


def calibration_table(done: tuple[Calibration, ...]) -> Table:
    table = Table(
        title="Calibration from the router's measurements",
        caption="ratio: live over profiled call time; router ms: the router's time per batch between calls; "
        "shared cores: how much calls beside it slowed a call; after idle: what idle gaps added per call "
        "(both taken out of the profile, which the prediction adds itself)",
    )
    for column in ("model", "hardware", "stages", "calls", "ratio", "router ms", "shared cores", "after idle ms"):
        left = column in ("model", "hardware", "stages")
        table.add_column(column, justify="left" if left else "right", no_wrap=column == "model")
    for c in done:
        ratio = f"{c.ratio:.3f}" if c.ratio is not None else "kept: few calls"
        table.add_row(
            c.model,
            c.hardware,
            ",".join(c.stages),
            str(c.calls),
            ratio,
            f"{c.dispatch_ms:.3f}",
            f"x{c.contention:.3f}",
            f"{c.woken_ms:.3f}",
        )
    return table
