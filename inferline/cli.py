"""The `inferline` command: wires the parts together and holds no logic of its own.

Every user error ends as one line on stderr and a non-zero exit (INFERLINE_DEBUG=1 shows the
traceback).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from inferline.calibration import MIN_CALLS, STOLEN_WARN
from inferline.catalog import DEFAULT_CATALOG, HardwareCatalog, load_catalog
from inferline.errors import InferlineError, SpecError
from inferline.output_paths import check_writable_file, write_text
from inferline.plan import load_plan
from inferline.planner.planning import STRATEGIES, make_plan
from inferline.planner.tuning.registry import TUNERS
from inferline.profiles import load_profiles
from inferline.runs import run_results, simulate_plan
from inferline.spec import PipelineSpec, load_spec
from inferline.startup import DEFAULT_STARTUP_S, parse_startup
from inferline.tables import plan_table, runs_table
from inferline.traces import load_trace
from inferline.validation import check_cores

HTTP_HELP = "(Triton) the server's HTTP address HOST:PORT: inference goes over it, cheaper per call than gRPC"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inferline", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="plan the cheapest configuration that meets the P99 SLO for a sample trace")
    p.add_argument("spec", help="pipeline spec (YAML)")
    p.add_argument("--profiles", required=True, help="directory of model profiles (*.json)")
    p.add_argument(
        "--trace", required=True, help="arrival trace file or generator, e.g. gamma:rate=200,cv=4,duration=600"
    )
    p.add_argument("--slo-ms", type=float, help="end-to-end P99 objective in ms (overrides the spec's slo_ms)")
    p.add_argument("--hardware", help="hardware catalog (YAML); default: the InferLine authors' AWS prices")
    p.add_argument("--strategy", default="inferline", choices=STRATEGIES, help="planning strategy")
    p.add_argument(
        "--scale-ladder",
        action="store_true",
        help="also plan for 1.5-4x the trace's rate, so the tuner can switch batch sizes rather than only add replicas",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--out", help="also write the plan JSON to this file")

    s = sub.add_parser("simulate", help="simulate a plan over a trace, optionally with a tuner scaling replicas")
    s.add_argument("spec", help="pipeline spec (YAML)")
    s.add_argument("--plan", required=True, help="plan JSON written by `inferline plan --json`")
    s.add_argument("--trace", required=True, help="arrival trace file or generator")
    s.add_argument("--tuner", default="inferline", choices=TUNERS, help="replica tuner (none = static plan)")
    s.add_argument("--profiles", help="profile directory (default: the one the plan was made from)")
    s.add_argument("--hardware", help="hardware catalog (default: the one the plan was made with)")
    s.add_argument(
        "--startup-s",
        default=str(DEFAULT_STARTUP_S),
        metavar="SECONDS|FILE",
        help="seconds before an added replica serves, or a decisions log (decisions.jsonl) or replay results JSON"
        " whose measured median replica start-up is used",
    )
    s.add_argument("--tick-s", type=float, default=0.25, help="tuner control period in seconds")
    s.add_argument(
        "--cores",
        type=float,
        help="every replica shares this many cores, as on one machine (default: each has its own hardware unit)",
    )
    s.add_argument("--seed", type=int, default=0, help="seed for conditional edges")
    s.add_argument("--json", action="store_true", help="print run results as JSON")
    s.add_argument("--plot", help="write a PNG of arrival rate, replicas per stage and latency over time")

    pr = sub.add_parser("profile", help="measure batch latency per batch size of models on a real model server")
    pr.add_argument("--adapter", default="triton", help="serving framework adapter (entry point name)")
    where = pr.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", help="address HOST:PORT of a running model server (Triton: its gRPC port)")
    where.add_argument("--embedded", metavar="MODEL_REPOSITORY", help="start a local server with this repository")
    pr.add_argument("--metrics", help="the server's metrics address HOST:PORT (with --server)")
    pr.add_argument("--http", help=HTTP_HELP + " (with --server)")
    pr.add_argument("--models", required=True, help="comma-separated model names")
    pr.add_argument("--batch-sizes", default="1,2,4,8,16,32", help="comma-separated, increasing")
    pr.add_argument("--hardware", required=True, help="hardware label the profiles are recorded under, e.g. cpu")
    pr.add_argument("--out", required=True, help="directory to write <model>.json profiles into")
    pr.add_argument("--samples", type=int, default=30, help="latency samples per batch size")
    pr.add_argument("--warmup", type=int, default=3, help="warm-up batches per batch size")
    pr.add_argument("--budget-s", type=float, default=10.0, help="time budget per batch size in seconds")
    pr.add_argument("--drop-flat", action="store_true", help="drop batch sizes that do not raise throughput")
    pr.add_argument(
        "--idle-rounds",
        type=int,
        default=None,
        help="rounds of calls after idle gaps, for the latency a call adds after its replica sat idle "
        "(0: skip; default 20)",
    )
    pr.add_argument(
        "--interference-rounds",
        type=int,
        default=None,
        help="rounds of calls alone and beside a busy neighbour per core, for how much calls computing "
        "beside a model slow it (a server on this machine only; 0: skip; default 15)",
    )

    li = sub.add_parser("lineage", help="replay sample queries through a pipeline and measure each edge's real rate")
    li.add_argument("spec", help="pipeline spec (YAML); routed edges use their route, the others are sampled")
    li.add_argument("--adapter", default="triton", help="serving framework adapter (entry point name)")
    lwhere = li.add_mutually_exclusive_group(required=True)
    lwhere.add_argument("--server", help="address HOST:PORT of the model server hosting all the stages' models")
    lwhere.add_argument("--embedded", metavar="MODEL_REPOSITORY", help="start a local server with this repository")
    li.add_argument("--samples", type=int, default=200, help="queries to replay")
    li.add_argument("--seed", type=int, default=0)
    li.add_argument("--write-spec", help="write the spec with the measured probabilities filled in (YAML)")

    ag = sub.add_parser(
        "agent", help="run the sidecar agent (gRPC: Describe, Profile, Configure) next to a model server"
    )
    ag.add_argument("--adapter", default="triton", help="serving framework adapter (entry point name)")
    ag.add_argument("--server", required=True, help="the model server's address HOST:PORT (Triton: its gRPC port)")
    ag.add_argument("--metrics", help="the model server's metrics address HOST:PORT")
    ag.add_argument("--http", help=HTTP_HELP)
    ag.add_argument("--hardware", required=True, help="hardware label of this server, e.g. cpu or v100")
    ag.add_argument("--token-file", help="file holding the token (default: $INFERLINE_AGENT_TOKEN)")
    ag.add_argument("--host", default="127.0.0.1", help="address to bind")
    ag.add_argument("--port", type=int, default=50151, help="gRPC port (0 = a free port, printed)")
    ag.add_argument("--metrics-port", type=int, default=0, help="Prometheus port (0 = a free port, printed)")
    ag.add_argument("--tls-cert", help="PEM certificate: serve TLS (with --tls-key)")
    ag.add_argument("--tls-key", help="PEM private key for --tls-cert")

    for command, text in (
        ("serve", "deploy a plan locally and serve it in the foreground, with the live tuner"),
        ("up", "deploy a plan locally in the background (inferline down stops it)"),
    ):
        sv = sub.add_parser(command, help=text)
        sv.add_argument("plan", help="plan JSON from `inferline plan --out`")
        sv.add_argument("--spec", help="pipeline spec (default: the one the plan was made for)")
        sv.add_argument("--models", default="examples/models", help="model repository for the embedded server")
        sv.add_argument("--tuner", default="inferline", choices=TUNERS, help="live replica tuner (none = static)")
        sv.add_argument("--tick-s", type=float, default=1.0, help="tuner control period in seconds")
        sv.add_argument("--grpc-port", type=int, default=0, help="router gRPC port (0 = a free port)")
        sv.add_argument("--http-port", type=int, default=0, help="router HTTP port (0 = a free port)")
        sv.add_argument("--max-queue", type=int, default=2000, help="queries in flight before overload is refused")
        sv.add_argument("--state-dir", default=".inferline", help="where up.json and the decision log go")
    rp = sub.add_parser("replay", help="open-loop load from a trace against a running pipeline, next to the estimate")
    rp.add_argument("--trace", required=True, help="arrival trace file or generator")
    rp.add_argument("--state-dir", default=".inferline", help="the pipeline `inferline up` started from here")
    rp.add_argument("--endpoint", help="a router's address instead (HOST:PORT; for http also a URL)")
    rp.add_argument(
        "--protocol", choices=("grpc", "http"), default="http", help="KServe v2 over HTTP (cheaper) or over gRPC"
    )
    rp.add_argument("--plan", help="the plan it serves (for the estimate and cost; default: from up.json)")
    rp.add_argument("--pipeline", help="pipeline (model) name at --endpoint (default: the plan's)")
    rp.add_argument("--slo-ms", type=float, help="SLO for the miss rate (default: the plan's)")
    rp.add_argument(
        "--cores",
        type=float,
        help="estimate with every replica sharing this many cores (default: a local `up` deployment's cores)",
    )
    rp.add_argument("--timeout-s", type=float, default=30.0, help="per-query timeout")
    rp.add_argument("--seed", type=int, default=0, help="seed of the random query inputs")
    rp.add_argument("--json", action="store_true", help="print the run results as JSON")
    rp.add_argument("--out", help="also write the run results JSON here")
    rp.add_argument(
        "--metrics-out",
        help="keep the router's metrics from before and after the replay in this directory, for `inferline "
        "calibrate --metrics DIR/router-metrics-after.txt --since DIR/router-metrics-before.txt`",
    )
    ca = sub.add_parser(
        "calibrate", help="rewrite a plan's profiles from the service times its running router measured"
    )
    ca.add_argument("plan", help="the plan the pipeline runs (its spec and profiles are found from it)")
    ca.add_argument("--out", required=True, help="directory for the calibrated profiles (all models, a new one)")
    ca.add_argument("--state-dir", default=".inferline", help="the pipeline `inferline up` started from here")
    ca.add_argument("--metrics", help="the router's /metrics URL, or a file saved from it (default: from up.json)")
    ca.add_argument("--profiles", help="profiles to calibrate (default: the plan's)")
    ca.add_argument("--min-calls", type=int, default=MIN_CALLS, help="calls a model needs before it is calibrated")
    ca.add_argument(
        "--since",
        help="the router's metrics saved before the replay to calibrate from (a file of its /metrics text): "
        "only what it measured after them counts (default: all it measured since it started)",
    )
    ca.add_argument(
        "--max-stolen",
        type=float,
        help="refuse, writing nothing, where the machine's hypervisor took more than this share of its CPU "
        f"while the calls were measured (default: calibrate, and say so from {100 * STOLEN_WARN:g}%%)",
    )
    ca.add_argument(
        "--cores",
        type=float,
        help="the replicas shared this many cores in the run: take out how they slowed each other "
        "(default: a local `up` deployment's cores when the metrics come from it)",
    )
    dn = sub.add_parser("down", help="stop what `inferline up` started")
    dn.add_argument("--state-dir", default=".inferline")

    d = sub.add_parser("demo", help="the main job on the bundled example (see README)")
    d.add_argument("--out", default="demo-out", help="directory for the report (JSON and plots)")
    d.add_argument("--simulated", action="store_true", help="the all-simulated demo (no model server)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        if args.command == "plan":
            return _plan(args)
        if args.command == "simulate":
            return _simulate(args)
        if args.command == "profile":
            from inferline.profile_command import run_profile

            return run_profile(args, Console(stderr=True))
        if args.command in ("serve", "up", "down"):
            from inferline import serve_command

            runner = {"serve": serve_command.run_serve, "up": serve_command.run_up, "down": serve_command.run_down}
            return runner[args.command](args, Console())
        if args.command == "replay":
            from inferline.replay_command import run_replay

            return run_replay(args, Console(stderr=args.json))
        if args.command == "calibrate":
            from inferline.calibrate_command import run_calibrate

            return run_calibrate(args, Console())
        if args.command == "agent":
            return _agent(args)
        if args.command == "lineage":
            from inferline.profile_command import run_lineage

            return run_lineage(args, Console())
        if args.simulated:
            from inferline.demo import run_demo

            return run_demo(Path(args.out), Console())
        from inferline.live_demo import run_live_demo

        return run_live_demo(Path(args.out), Console())
    except InferlineError as exc:
        if os.environ.get("INFERLINE_DEBUG"):
            raise
        print(f"inferline: error: {exc.one_line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("inferline: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader (e.g. `| head`) went away: not an error of ours; silence the flush at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _catalog(path: str | None) -> HardwareCatalog:
    return load_catalog(path) if path else DEFAULT_CATALOG


def _slo_ms(spec: PipelineSpec, override: float | None) -> float:
    slo = override if override is not None else spec.slo_ms
    if slo is None:
        raise SpecError(f"pipeline {spec.name!r} has no slo_ms", "add slo_ms to the spec or pass --slo-ms")
    if not (slo > 0 and math.isfinite(slo)):
        raise SpecError(f"--slo-ms must be a positive finite number, got {slo:g}", "pass an SLO in milliseconds")
    return slo


def _plan(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    slo_ms = _slo_ms(spec, args.slo_ms)
    profiles = load_profiles(args.profiles)
    catalog = _catalog(args.hardware)
    arrivals = load_trace(args.trace)
    plan = make_plan(spec, profiles, catalog, arrivals, slo_ms, args.strategy, ladder=args.scale_ladder)
    plan = plan.model_copy(
        update={
            "profiles": str(Path(args.profiles).resolve()),
            "hardware_catalog": str(Path(args.hardware).resolve()) if args.hardware else None,
            "spec": str(Path(args.spec).resolve()),
        }
    )
    if args.json:
        print(plan.to_json())
    elif plan.feasible:
        Console().print(plan_table(plan))
    if args.out:
        write_text(args.out, plan.to_json() + "\n", "plan")
    if not plan.feasible:
        print(f"inferline: infeasible: {plan.reason}", file=sys.stderr)
        return 1
    return 0


def _simulate(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    plan = load_plan(args.plan)
    arrivals = load_trace(args.trace)
    startup_s, measured_in = parse_startup(args.startup_s)
    check_cores(args.cores)
    if args.seed < 0:
        raise InferlineError(f"--seed must be 0 or more, got {args.seed}", "pass e.g. --seed 1")
    if not 0.001 <= args.tick_s <= 3600:
        raise InferlineError(f"--tick-s must be 0.001 to 3600 seconds, got {args.tick_s:g}", "e.g. --tick-s 0.25")
    if args.plot:
        check_writable_file(args.plot, "plot")
    result = simulate_plan(
        spec, plan, arrivals, args.tuner, profiles_dir=args.profiles, catalog_path=args.hardware,
        tick_s=args.tick_s, startup_s=startup_s, seed=args.seed, cores=args.cores,
    )  # fmt: skip
    results = run_results(result, args.tuner) | {"startup_s": startup_s}
    if args.cores is not None:
        results["cores"] = args.cores
    if measured_in is not None:
        results["startup_measured_in"] = measured_in
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        Console().print(runs_table(f"{spec.name}: simulated over {args.trace}", [(args.tuner, results)]))
    if args.plot:
        from inferline.plots import plot_run

        plot_run(result, args.plot, f"{spec.name} · tuner {args.tuner}")
    return 0


def _agent(args: argparse.Namespace) -> int:
    from inferline.agent.auth import load_token
    from inferline.agent.server import AgentServer, run
    from inferline.profile_command import adapter_options

    def announce(agent: AgentServer) -> None:
        print(f"inferline agent serving on {agent.address}; metrics on {agent.metrics_address}", flush=True)

    run(
        args.adapter, args.server, args.hardware, load_token(args.token_file),
        adapter_options=adapter_options(args),
        host=args.host, port=args.port, metrics_port=args.metrics_port,
        tls_cert=args.tls_cert, tls_key=args.tls_key, on_ready=announce,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
