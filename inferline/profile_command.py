"""`inferline profile` and `inferline lineage`: adapter, optional embedded server, profiler, progress."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from inferline.adapters.base import ServerHandle
from inferline.adapters.registry import connect, embedded_server
from inferline.agent.lineage import measure_lineage
from inferline.agent.profiler import ProfileProgress, ProfileSettings, ProfileWritten, profile_to_directory
from inferline.errors import InferlineError
from inferline.output_paths import check_creatable_dir, check_writable_file
from inferline.process_cpu import group_clock
from inferline.spec import load_spec, with_probabilities, write_spec


def csv_names(text: str, what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise InferlineError(f"{what} is empty", f"pass a comma-separated list to {what}")
    return names


def csv_ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(n) for n in csv_names(text, what))
    except ValueError:
        raise InferlineError(f"{what} {text!r} is not a list of integers", "e.g. 1,2,4,8,16,32") from None


@contextlib.contextmanager
def server_for(args: argparse.Namespace, models: list[str]) -> Iterator[ServerHandle]:
    if args.embedded:
        with embedded_server(args.adapter, args.embedded, models) as handle:
            yield handle
    else:
        yield ServerHandle(args.server, adapter_options(args), 0.0)


def adapter_options(args: argparse.Namespace) -> dict[str, str]:
    """The adapter options that `--metrics` and `--http` name (for a server given by address)."""
    named = {"metrics_address": getattr(args, "metrics", None), "http_address": getattr(args, "http", None)}
    return {key: value for key, value in named.items() if value}


def run_profile(args: argparse.Namespace, console: Console) -> int:
    models = csv_names(args.models, "--models")
    settings = ProfileSettings(
        batch_sizes=csv_ints(args.batch_sizes, "--batch-sizes"),
        warmup=args.warmup,
        samples=args.samples,
        budget_s=args.budget_s,
        drop_flat=args.drop_flat,
        idle_rounds=ProfileSettings.idle_rounds if args.idle_rounds is None else args.idle_rounds,
        interference_rounds=(
            ProfileSettings.interference_rounds if args.interference_rounds is None else args.interference_rounds
        ),
    )
    if (
        settings.samples < 1
        or settings.warmup < 0
        or settings.budget_s <= 0
        or settings.idle_rounds < 0
        or settings.interference_rounds < 0
    ):
        raise InferlineError(
            "--samples must be >= 1, --warmup >= 0, --budget-s > 0, --idle-rounds >= 0 and --interference-rounds >= 0",
            "pass sensible values",
        )
    check_creatable_dir(args.out, "--out folder")
    results: list[ProfileWritten] = []
    with server_for(args, models) as handle:
        if handle.startup_s:
            console.print(f"started an embedded {args.adapter} server in {handle.startup_s:.2f} s")
        adapter = connect(args.adapter, handle.address, **handle.options)
        try:
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
                tasks = {m: bar.add_task(f"{m}", total=len(settings.batch_sizes)) for m in models}

                def on_progress(p: ProfileProgress) -> None:
                    bar.update(tasks[p.model], completed=p.done, description=f"{p.model} batch {p.batch_size}")

                results = profile_to_directory(
                    adapter, models, args.hardware, settings, args.out, on_progress, server_cpu=group_clock(handle.pid)
                )
        finally:
            adapter.close()
    table = Table(title=f"profiles written to {args.out}")
    for column in ("model", "batch sizes", "seconds", "file"):
        table.add_column(column)
    for r in results:
        table.add_row(r.model, ",".join(map(str, r.batch_sizes)), f"{r.wall_s:.1f}", str(r.path))
    Console().print(table)
    return 0


def run_lineage(args: argparse.Namespace, console: Console) -> int:
    spec = load_spec(args.spec)
    if args.samples < 1:
        raise InferlineError(f"--samples must be >= 1, got {args.samples}", "pass a positive count")
    if args.write_spec:
        check_writable_file(args.write_spec, "--write-spec file")
    models = sorted({s.model for s in spec.stages})
    with server_for(args, models) as handle:
        adapter = connect(args.adapter, handle.address, **handle.options)
        try:
            measures = measure_lineage(spec, adapter, args.samples, args.seed)
        finally:
            adapter.close()
    table = Table(title=f"{spec.name}: edge rates over {args.samples} replayed queries")
    for column in ("stage", "decided by", "reached", "continued", "spec", "measured"):
        table.add_column(column)
    for m in measures:
        table.add_row(
            m.stage, "route" if m.routed else "sampled", str(m.reached), str(m.continued),
            f"{m.spec_probability:.3f}", f"{m.measured:.3f}",
        )  # fmt: skip
    console.print(table)
    if args.write_spec:
        write_spec(with_probabilities(spec, {m.stage: m.measured for m in measures if m.routed}), args.write_spec)
        console.print(f"spec with measured probabilities written to {args.write_spec}")
    return 0
