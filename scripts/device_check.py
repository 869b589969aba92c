"""One prepared accelerator check: figures from a GPU or TPU lent for a few minutes.

    python scripts/device_check.py --out docs/results/devices/h100     # on the device
    python scripts/device_check.py --rehearse --out /tmp/device-check  # CPU rehearsal (CI)

Six stages, in order, within ``--budget_s`` seconds in all (default 480):

1. ``environment``: device kind and count, memory, JAX/jaxlib versions, the HBM peak
   (``fbjax.profiling.device.hbm_peak_tbs``), whether the device's Pallas kernel lowers
   (Triton for CUDA/ROCm, Mosaic for TPU) and what ``attention_impl="auto"`` picks.
2. ``conformance``: the kernel conformance suite (``tests/kernels/test_conformance.py``)
   for the device's Pallas kernel, compiled for the device, not interpreted: pytest with
   ``JAX_PLATFORMS`` left to JAX (the tests' conftest defaults it to cpu, where the
   kernels interpret) and float32 matmuls at full precision (the suite's tolerances are
   float32's; JAX's default is TF32 on GPUs, bf16 passes on TPUs). This is the stage
   that vouches for ``attention_impl="auto"`` choosing Pallas.
3. ``kernels``: ``fbjax_kernels.ragged_paged_attention.bench`` (what
   ``scripts/bench_kernels.py`` prints) at decode, prefill and mixed shapes: ms, KV GB/s
   and % of the HBM peak, the Pallas kernel against the jax.numpy reference by XLA.
4. ``engine``: the default model (``--model``) generating greedily through the Pallas
   kernel and through the reference, one engine each on the same bucket ladder: the
   outputs must be equal token for token; output tokens/s at each of ``--streams``.
5. ``profile``: the latency profile of the engine as ``attention_impl="auto"`` builds it
   (default buckets), by ``fbjax.profiling.measure.record_profile`` (the path of
   ``python -m fbjax.profile``), with its held-out error, written under ``--out`` to be
   copied into ``fbjax/configs/profiles``.
6. ``replay``: FairBatching vs Sarathi through that engine on that profile, each beside
   the simulator's prediction (``fbjax.replay.engine.compare_policies``, as
   ``scripts/bench_engine_schedulers.py``), SLOs of the evaluation protocol's
   ``strict`` setting relative to the device's own unloaded latencies.

Stages 1 and 2 run in child processes, before this one opens the device: a TPU serves
one process at a time, and a kernel that faults the device takes down only its own
stage. Every stage's result is written as soon as it ends (``results.json`` and the
report ``<device>.md`` in ``--out``, rewritten after each stage), so a kill loses at
most the running stage. A stage that needs more than the budget left is skipped and
says so; a failing stage is recorded with its error and the next one runs; at the end
of the budget a watchdog records the running stage as stopped and exits. ``--rehearse``
runs the same code on CPU at toy sizes (the kernels interpreted, the built-in model) in
about a minute: tests/test_device_check.py runs it, so the script cannot rot before a
device comes. See docs/devices.md.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import platform as platform_module
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

from absl import app, flags

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "kernels"))
sys.path.insert(0, str(REPO_ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from fbjax_kernels.ragged_paged_attention import (  # noqa: E402
    IMPLEMENTATIONS,
    PALLAS_FOR_PLATFORM,
    resolve_impl,
)
from fbjax_kernels.ragged_paged_attention.bench import (  # noqa: E402
    Shape,
    Timing,
    bench_shape,
    make_inputs,
    shapes,
)

from fbjax.catalog import BUILTIN_MODEL, DEFAULT_MODEL, packaged_model  # noqa: E402
from fbjax.config import (  # noqa: E402
    BucketConfig,
    CacheConfig,
    ConfigError,
    EngineConfig,
    SchedulerConfig,
)
from fbjax.profiling.device import current_device_key, device_detail, hbm_peak_tbs  # noqa: E402
from fbjax.profiling.measure import GridSettings  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Folder for every result: results.json, <device>.md, the "
                    "profile, the conformance log.")
flags.DEFINE_float("budget_s", None, "Wall-clock seconds for the whole check (default 480; "
                   "90 with --rehearse).")
flags.DEFINE_bool("rehearse", False, "CPU rehearsal: kernels interpreted, the built-in "
                  "model, toy sizes; what CI runs.")
flags.DEFINE_string("model", None, f"Model of stages 4-6 (default {DEFAULT_MODEL}; "
                    f"{BUILTIN_MODEL} with --rehearse).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Engine dtype (stages 4-6).")
flags.DEFINE_string("pallas", None, "The Pallas kernel under test (default: the device's, "
                    "as attention_impl=auto picks it; pallas_gpu with --rehearse).")
flags.DEFINE_list("streams", None, "Concurrent requests of stage 4 (default 1,32; 1,4 "
                  "with --rehearse).")
flags.DEFINE_string("matmul_precision", "highest", "jax.default_matmul_precision of stage "
                    "4's engines (highest: float32 matmuls in float32, so that the "
                    "reference's own rounding does not flip greedy tokens; 'default' for "
                    "the serving default).")
flags.DEFINE_string("trace", "azure_llm_2023_conv", "Trace of stage 6 (name or path); a "
                    "synthetic one when it cannot be found here.")
flags.DEFINE_list("stages", None, "Run only these stages (the others are reported skipped).")
flags.DEFINE_string("probe_to", None, "Internal (stage 1's child): write this machine's "
                    "environment facts to this JSON file and exit.")

# Protocol SLO setting of stage 6 (fbjax.sim.protocol): relative to unloaded latencies.
SLO_SETTING = "strict"
# Stage 4's prompts are windows of this text, tokenized by the model's own tokenizer
# (real words give a real model peaked next-token distributions, as in use).
PROMPT_TEXT = (
    "The river rose slowly through the spring, and the people of the valley moved their "
    "stores to the upper barns. Every morning the miller walked along the dyke and counted "
    "the stones that the water had taken in the night. He wrote the numbers in a small book "
    "with a green cover, next to the weather and the price of flour. His daughter, who was "
    "learning to read, copied the figures into her own book and added drawings of boats, "
    "clouds and the long-legged birds that waited in the shallows for fish. When the water "
    "finally fell, the fields were covered with a fine grey silt that made the best wheat "
    "anyone could remember. Travellers came from the coast to buy it, and they brought news "
    "of ships, of new roads over the mountains, and of a school in the city where children "
    "learned arithmetic from a machine of brass wheels. The miller did not believe in the "
    "machine, but he kept the book, and years later his daughter showed it to the teachers "
    "of that school as proof that a careful person with a pencil could see a flood coming "
    "a week before it arrived. They asked her to stay and teach, and she did, for forty "
    "years, in a room that looked over the harbour, where she kept a green book of her "
    "own with the tides, the wind, the ships that came in and the ones that did not. "
) * 3


# ------------------------------------------------------------------------------ the plan


@dataclasses.dataclass(frozen=True)
class Plan:
    """How big each stage is: the device's sizes, or the rehearsal's toy ones."""

    rehearse: bool
    model: str
    dtype: str
    pallas: str  # the Pallas kernel under test
    conformance_files: tuple[str, ...]
    conformance_k: str  # pytest -k selection
    kernel_shapes: tuple[Shape, ...]
    kernel_dtype: str
    kernel_repeats: int
    streams: tuple[int, ...]
    prompt_len: int
    output_len: int
    engine_buckets: BucketConfig  # stage 4's ladder, the same for both engines
    buckets: BucketConfig  # stages 5 and 6: the engine as served
    num_pages: int
    max_model_len: int | None  # None: the model's
    grid: GridSettings  # time_limit_s: set from the stage's time
    trace: str
    slice_start_s: float
    slice_s: float
    calibrate_s: float
    model_note: str = ""  # why the model is not the one asked for


def device_plan(pallas: str, model: str, dtype: str, streams: tuple[int, ...]) -> Plan:
    files, select = ["tests/kernels/test_conformance.py"], pallas
    if pallas == "pallas_gpu":  # and the Triton lowering test (its other file)
        files.append("tests/kernels/test_pallas_gpu.py::test_lowers_to_triton")
        select += " or test_lowers_to_triton"
    return Plan(
        rehearse=False, model=model, dtype=dtype, pallas=pallas,
        conformance_files=tuple(files), conformance_k=select,
        kernel_shapes=tuple(shapes(small=False)), kernel_dtype="bfloat16", kernel_repeats=20,
        streams=streams, prompt_len=128, output_len=128,
        engine_buckets=workload_buckets(streams, BucketConfig().max_tokens),
        buckets=BucketConfig(), num_pages=CacheConfig.num_pages, max_model_len=None,
        grid=GridSettings(points_per_bucket=12, warmup=1, repeats=3),
        trace=FLAGS.trace, slice_start_s=600.0, slice_s=120.0, calibrate_s=10.0,
    )


def rehearsal_plan(pallas: str, model: str, dtype: str, streams: tuple[int, ...]) -> Plan:
    return Plan(
        rehearse=True, model=model, dtype=dtype, pallas=pallas,
        conformance_files=("tests/kernels/test_conformance.py",),
        conformance_k=f"{pallas} and test_scenarios and decode-float32",
        kernel_shapes=(Shape("decode 4 x 64", (1,) * 4, (64,) * 4, 4, 2, 32),),
        kernel_dtype="bfloat16", kernel_repeats=2,
        streams=streams, prompt_len=12, output_len=6,
        engine_buckets=BucketConfig((32,), (max(streams),)),  # one bucket: compiles fast
        buckets=BucketConfig((16, 32), (4,)), num_pages=64, max_model_len=256,
        grid=GridSettings(points_per_bucket=4, warmup=0, repeats=2, pooled=True),
        trace=FLAGS.trace, slice_start_s=600.0, slice_s=30.0, calibrate_s=0.0,
    )


# stage -> (seconds it needs at least, seconds it is planned to take), on a device and
# in the rehearsal
BUDGETS = {
    False: {"environment": (10, 30), "conformance": (40, 150), "kernels": (15, 45),
            "engine": (40, 120), "profile": (40, 90), "replay": (30, 70)},
    True: {"environment": (5, 30), "conformance": (8, 60), "kernels": (3, 20),
           "engine": (5, 40), "profile": (5, 15), "replay": (5, 12)},
}


def pallas_under_test(platform: str) -> str | None:
    """The Pallas kernel to check: ``--pallas``, else the one ``auto`` picks on
    ``platform`` (None on CPU), else in the rehearsal the GPU one (its interpreter is
    the faster)."""
    return FLAGS.pallas or PALLAS_FOR_PLATFORM.get(platform) or (
        "pallas_gpu" if FLAGS.rehearse else None)


def make_plan(platform: str) -> Plan:
    """The plan for this machine and the flags (ValueError: no accelerator, no rehearsal)."""
    rehearse = FLAGS.rehearse
    pallas = pallas_under_test(platform)
    if pallas is None:
        raise ValueError(f"no Pallas kernel for the {platform!r} platform: run on a GPU or "
                         "TPU, or rehearse on CPU with --rehearse")
    if pallas not in PALLAS_FOR_PLATFORM.values():
        raise ValueError(f"--pallas must be one of {sorted(PALLAS_FOR_PLATFORM.values())}")
    model, note = FLAGS.model or (BUILTIN_MODEL if rehearse else DEFAULT_MODEL), ""
    if not FLAGS.model and not rehearse:
        model, note = default_model()
    streams = tuple(int(s) for s in FLAGS.streams or (("1", "4") if rehearse else ("1", "32")))
    build = rehearsal_plan if rehearse else device_plan
    return dataclasses.replace(build(pallas, model, FLAGS.dtype, streams), model_note=note)


def default_model() -> tuple[str, str]:
    """(the default model, "") where its package is installed, else (the built-in
    model, why): stages 4-6 still check the kernel in the engine, on a toy model."""
    try:
        packaged_model(DEFAULT_MODEL).path()
    except ConfigError as e:
        return BUILTIN_MODEL, (f"{DEFAULT_MODEL} is not installed here, so the built-in "
                               f"model stands in ({str(e).split(': run')[0]})")
    return DEFAULT_MODEL, ""


# ------------------------------------------------------------------------- the results


@dataclasses.dataclass
class StageResult:
    """One stage as results.json records it."""

    name: str
    title: str
    status: str = "pending"
    seconds: float = 0.0
    summary: str = ""  # one line for the summary table
    error: str | None = None
    figures: dict[str, Any] = dataclasses.field(default_factory=dict)
    details: str = ""  # markdown for the report


@dataclasses.dataclass
class Done:
    """What a stage returns: its summary line, figures and report section."""

    summary: str
    figures: dict[str, Any]
    details: str = ""


class StageFailed(Exception):
    """The stage ran to its end and found something wrong; its figures stand."""

    def __init__(self, error: str, done: Done) -> None:
        super().__init__(error)
        self.done = done


class StageSkipped(Exception):
    """The stage cannot run here or now (the message says why)."""


class Check:
    """The state of one run: plan, budget, results, and what stages hand on."""

    def __init__(self, out: Path, budget_s: float, rehearse: bool) -> None:
        self.out, self.budget_s, self.rehearse = out, budget_s, rehearse
        self.plan: Plan | None = None  # once stage 1 has said what the device is
        self.start = time.monotonic()
        self.started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds")
        self.results = {name: StageResult(name, title) for name, (title, _) in STAGES.items()}
        self.env: dict[str, Any] = {}
        self.lock = threading.RLock()
        self.child: subprocess.Popen | None = None
        self.profile_engine = None  # stage 5 -> 6
        self.profile_path: Path | None = None
        self.report_name: str | None = None

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> float:
        return self.budget_s - self.elapsed()

    @functools.cached_property
    def loaded(self):
        """The model of stages 4-6, loaded once and shared by every engine (the
        engines' compilation cache on first: loading compiles too)."""
        from fbjax.engine.buckets import enable_compilation_cache
        from fbjax.model.weights import load_model

        enable_compilation_cache(EngineConfig().compilation_cache_dir)
        return load_model(self.plan.model, jnp.dtype(self.plan.dtype))

    @property
    def device_name(self) -> str:
        """The report's name: the device key (this process may not open the device)."""
        return self.env.get("device_key") or "device"

    def save(self) -> None:
        """Rewrite results.json and the report with every result so far."""
        with self.lock:
            data = {"device": self.env, "rehearse": self.rehearse,
                    "budget_s": self.budget_s, "elapsed_s": round(self.elapsed(), 1),
                    "started_at": self.started_at, "command": " ".join(sys.argv),
                    "stages": [dataclasses.asdict(r) for r in self.results.values()]}
            write_atomic(self.out / "results.json", json.dumps(data, indent=1) + "\n")
            name = f"{self.device_name}.md"
            if self.report_name not in (None, name):  # named before the device was known
                (self.out / self.report_name).unlink(missing_ok=True)
            write_atomic(self.out / name, report(self))
            self.report_name = name


def write_atomic(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all (a kill mid-write leaves the previous file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def summary_table(results: list[StageResult]) -> str:
    lines = ["| stage | status | seconds | result |", "|---|---|---:|---|"]
    for i, r in enumerate(results, 1):
        text = r.summary
        if r.error:
            first = r.error.strip().splitlines()[-1] if r.error.strip() else ""
            text = f"{text}; {first}" if text else first
        lines.append(f"| {i}. {r.name} | {r.status} | {r.seconds:.1f} | "
                     f"{text.replace('|', '/')} |")
    return "\n".join(lines)


def report(check: Check) -> str:
    """The markdown report (``<device>.md``): the summary table, then each stage."""
    env = check.env
    title = env.get("device_kind", "this device")
    head = [f"# Device check: {title}", "",
            f"`python scripts/device_check.py {' '.join(sys.argv[1:])}`, started "
            f"{check.started_at}, budget {check.budget_s:.0f} s, elapsed "
            f"{check.elapsed():.0f} s" + (" (CPU rehearsal: the kernels interpreted, toy "
                                           "sizes; not device figures)"
                                           if check.rehearse else "") + ".", "",
            summary_table(list(check.results.values())), ""]
    for i, r in enumerate(check.results.values(), 1):
        head += [f"## {i}. {r.title}", ""]
        if r.status in ("skipped", "pending", "running"):
            head += [f"{r.status}{': ' + r.summary if r.summary else ''}", ""]
        if r.details:
            head += [r.details, ""]
        if r.error:
            head += ["Error:", "", "```", r.error.strip()[-3000:], "```", ""]
    return "\n".join(head)


# ----------------------------------------------------------------- 1. the environment


def memory_gib(device) -> float | None:
    """The device memory JAX may use: its allocator's limit (a GPU's is a share of the
    card's, XLA_PYTHON_CLIENT_MEM_FRACTION); host RAM for a CPU."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return stats["bytes_limit"] / 2**30
    if device.platform == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return None


def lowering_platform(device) -> str | None:
    """The platform a Pallas kernel lowers for on ``device`` (None on CPU)."""
    if device.platform == "gpu":
        version = str(getattr(device.client, "platform_version", "")).lower()
        return "rocm" if "rocm" in version else "cuda"
    return "tpu" if device.platform == "tpu" else None


def lowers(impl: str, target: str) -> str:
    """Whether ``impl`` lowers for ``target`` (its Triton / Mosaic lowering is here):
    "yes", or the error."""
    args = make_inputs(Shape("probe", (1, 3), (17, 40), 4, 2, 64), jnp.float32,
                       np.random.default_rng(0))
    fn = jax.jit(functools.partial(IMPLEMENTATIONS[impl], interpret=False))
    try:
        fn.trace(*args).lower(lowering_platforms=(target,))
    except Exception as e:  # noqa: BLE001 - the answer is the error
        return f"no: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return "yes"


def environment_facts() -> dict[str, Any]:
    """What stage 1 reports (the probe child computes it: this opens the device)."""
    import jaxlib

    device = jax.devices()[0]
    pallas = pallas_under_test(device.platform)
    # on CPU (the rehearsal) the Triton lowering can still be checked: it needs no GPU
    target = lowering_platform(device) or ("cuda" if pallas == "pallas_gpu" else None)
    return {
        "platform": device.platform, "device_kind": device.device_kind,
        "device_key": current_device_key(), "num_devices": jax.device_count(),
        "memory_gib": memory_gib(device), "hbm_peak_tbs": hbm_peak_tbs(device.device_kind),
        "jax": jax.__version__, "jaxlib": jaxlib.__version__,
        "python": platform_module.python_version(),
        "platform_version": str(getattr(device.client, "platform_version", "")),
        "auto_attention_impl": resolve_impl("auto"), "pallas_under_test": pallas,
        "pallas_lowering_target": target,
        "pallas_lowers": (lowers(pallas, target) if pallas and target
                          else f"not checked (lowering {pallas} needs its device)"),
        **{k: v for k, v in device_detail().items() if k not in ("platform", "device_kind")},
    }


def child_command(*args: str) -> list[str]:
    """This script again, with the flags that shape what a child checks."""
    passed = [f"--pallas={FLAGS.pallas}"] if FLAGS.pallas else []
    return [sys.executable, str(Path(__file__).resolve()), *passed,
            *(["--rehearse"] if FLAGS.rehearse else []), *args]


def stage_environment(check: Check, limit_s: float) -> Done:
    path = check.out / "environment.json"
    path.unlink(missing_ok=True)
    code, tail = run_streaming(check, child_command(f"--probe_to={path}"), dict(os.environ),
                               REPO_ROOT, check.out / "environment.log", limit_s, echo=False)
    if code != 0 or not path.exists():
        raise RuntimeError(f"the probe exited {code}: {tail[-2000:]}")
    env = json.loads(path.read_text())
    check.env.update(env)
    memory = (f"{env['memory_gib']:.1f} GiB for JAX" if env["memory_gib"]
              else "memory unknown")
    peak = f"HBM peak {env['hbm_peak_tbs']} TB/s" if env["hbm_peak_tbs"] else "HBM peak unknown"
    target = env["pallas_lowering_target"]
    summary = (f"{env['platform']} {env['device_kind']} x{env['num_devices']}, {memory}, {peak}, "
               f"jax {env['jax']}; {env['pallas_under_test']} lowers for {target}: "
               f"{env['pallas_lowers'][:60]}; auto -> {env['auto_attention_impl']}")
    details = "\n".join(f"- {k}: {round(v, 1) if isinstance(v, float) else v}"
                        for k, v in env.items())
    done = Done(summary, env, details)
    if target and env["pallas_lowers"] != "yes":
        raise StageFailed(f"{env['pallas_under_test']} does not lower for {target}", done)
    return done


# ---------------------------------------------------------------- 2. kernel conformance


def conformance_command(plan: Plan, xml: Path) -> list[str]:
    # -o addopts=: no xdist (one process on the device), whether or not it is installed
    return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=",
            "-q", "-rfE", f"--junitxml={xml}", *plan.conformance_files,
            "-k", plan.conformance_k]


def conformance_env(plan: Plan) -> dict[str, str]:
    """The child's environment: this checkout's code; the device's backend (the tests'
    conftest defaults JAX_PLATFORMS to cpu, where Pallas kernels interpret), float32
    matmuls in float32 (the suite's tolerances)."""
    env = dict(os.environ)
    paths = [str(REPO_ROOT), str(REPO_ROOT / "kernels"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env["JAX_PLATFORMS"] = "cpu" if plan.rehearse else ""
    env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
    return env


@dataclasses.dataclass
class JUnit:
    tests: int = 0
    failures: int = 0
    errors: int = 0
    skipped: int = 0
    failed: list[str] = dataclasses.field(default_factory=list)  # "name: message"

    @property
    def passed(self) -> int:
        return self.tests - self.failures - self.errors - self.skipped


def read_junit(path: Path) -> JUnit:
    """Counts and failed test names from pytest's --junitxml file."""
    out = JUnit()
    for suite in ET.parse(path).getroot().iter("testsuite"):
        for field in ("tests", "failures", "errors", "skipped"):
            setattr(out, field, getattr(out, field) + int(suite.get(field, 0)))
        for case in suite.iter("testcase"):
            for bad in list(case.findall("failure")) + list(case.findall("error")):
                message = (bad.get("message") or "").splitlines()
                out.failed.append(f"{case.get('name')}: {message[0][:200] if message else ''}")
    return out


def run_streaming(check: Check, command: list[str], env: dict[str, str], cwd: Path,
                  log_path: Path, timeout_s: float, echo: bool = True
                  ) -> tuple[int | None, str]:
    """Run ``command``, echoing its output (progress) and saving it to ``log_path``;
    (exit code or None when killed at ``timeout_s``, the output's tail)."""
    tail: list[str] = []
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        check.child = proc

        def pump() -> None:
            for line in proc.stdout:
                if echo:
                    sys.stdout.write(f"  | {line}")
                    sys.stdout.flush()
                log.write(line)
                tail.append(line)
                del tail[:-40]

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            code = None
        reader.join(timeout=5)
        check.child = None
    return code, "".join(tail)


def kill_group(proc: subprocess.Popen) -> None:
    """Stop a child started in its own session, and everything it started."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def stage_conformance(check: Check, limit_s: float) -> Done:
    plan = check.plan
    xml, log = check.out / "conformance.xml", check.out / "conformance.log"
    xml.unlink(missing_ok=True)
    command = conformance_command(plan, xml)
    mode = "interpreted (CPU rehearsal)" if plan.rehearse else "compiled for the device"
    shown = shlex.join(["python", *command[1:]])
    print(f"  {plan.pallas}, {mode}: {shown}", flush=True)
    code, tail = run_streaming(check, command, conformance_env(plan), REPO_ROOT, log, limit_s)
    figures: dict[str, Any] = {"command": shown, "mode": mode,
                               "exit_code": code, "log": log.name}
    if code is None:
        raise StageFailed(f"stopped after {limit_s:.0f} s (the stage's share of the budget); "
                          f"see {log.name}", Done("timed out", figures))
    if not xml.exists():
        raise StageFailed(f"pytest exited {code} without results: {tail[-1500:]}",
                          Done(f"pytest exit {code}", figures))
    junit = read_junit(xml)
    figures.update(dataclasses.asdict(junit), passed=junit.passed)
    summary = (f"{plan.pallas} {mode}: {junit.passed} passed, {junit.failures + junit.errors} "
               f"failed, {junit.skipped} skipped")
    details = "\n".join([f"`{shown}`", "", summary]
                        + [f"- FAILED {f}" for f in junit.failed])
    done = Done(summary, figures, details)
    if junit.failed or code != 0 or junit.tests == 0:
        raise StageFailed(f"{len(junit.failed)} conformance tests failed (exit {code}); "
                          f"see {log.name}", done)
    return done


# ---------------------------------------------------------------------- 3. kernel bench


def timing_row(t: Timing, peak: float | None) -> dict[str, Any]:
    share = t.peak_share(peak)
    return {"shape": t.shape, "impl": t.impl, "ms": t.seconds * 1e3, "kv_gbs": t.kv_gbs,
            "peak_pct": None if share is None else share * 100, "tflops": t.tflops,
            "vs_reference": t.vs_reference, "interpreted": t.interpreted, "error": t.error}


def kernel_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| shape | impl | ms | KV GB/s | % HBM peak | TFLOP/s | vs reference |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['shape']} | {r['impl']} | error: "
                         f"{r['error'].splitlines()[0][:100]} | | | | |")
            continue
        pct = f"{r['peak_pct']:.0f}%" if r["peak_pct"] is not None else ""
        ratio = f"{r['vs_reference']:.2f}x" if r["vs_reference"] else ""
        lines.append(f"| {r['shape']} | {r['impl']}{' (interpreted)' if r['interpreted'] else ''}"
                     f" | {r['ms']:.3f} | {r['kv_gbs']:.1f} | {pct} | {r['tflops']:.3f} "
                     f"| {ratio} |")
    return "\n".join(lines)


def stage_kernels(check: Check, limit_s: float) -> Done:
    plan, peak = check.plan, check.env.get("hbm_peak_tbs")
    start = time.monotonic()
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    not_run: list[str] = []
    print("  " + kernel_table([]).splitlines()[0], flush=True)
    for shape in plan.kernel_shapes:
        if rows and time.monotonic() - start > limit_s:
            not_run.append(shape.name)
            continue
        for t in bench_shape(shape, ["reference", plan.pallas], jnp.dtype(plan.kernel_dtype),
                             plan.kernel_repeats, rng):
            row = timing_row(t, peak)
            rows.append(row)
            print(f"  {kernel_table([row]).splitlines()[-1]}", flush=True)
    ours = [r for r in rows if r["impl"] == plan.pallas and not r["error"]]
    parts = [f"{r['shape'].split(' (')[0]} {r['vs_reference']:.2f}x"
             + (f" ({r['peak_pct']:.0f}% of HBM peak)" if r["peak_pct"] is not None else "")
             for r in ours if r["vs_reference"]]
    summary = f"{plan.pallas} vs reference ({plan.kernel_dtype}): " + "; ".join(parts)
    details = kernel_table(rows)
    if not_run:
        details += f"\n\nNot run (the stage's time ran out): {', '.join(not_run)}"
    figures = {"dtype": plan.kernel_dtype, "hbm_peak_tbs": peak, "rows": rows,
               "not_run": not_run}
    done = Done(summary, figures, details)
    errors = [f"{r['impl']} on {r['shape']}: {r['error']}" for r in rows if r["error"]]
    if errors:
        raise StageFailed("; ".join(errors), done)
    return done


# ------------------------------------------------------------------------- 4. the engine


def workload_buckets(streams: tuple[int, ...], top: int) -> BucketConfig:
    """The smallest ladder that runs each stream count's decode steps unpadded in seqs
    and in a tight token bucket, and prefill chunks up to ``top`` tokens."""
    tokens = {max(4, 1 << (n - 1).bit_length()) for n in streams} | {top}
    return BucketConfig(tuple(sorted(t for t in tokens if t <= top)), tuple(sorted(streams)))


def engine_config(plan: Plan, impl: str, buckets: BucketConfig) -> EngineConfig:
    """An engine of the plan's model; no prefix cache (a timed rerun of the same prompts
    must prefill again), no profile (vLLM's policy)."""
    return EngineConfig(model=plan.model, attention_impl=impl, dtype=plan.dtype,
                        buckets=buckets, max_model_len=plan.max_model_len,
                        cache=CacheConfig(num_pages=plan.num_pages, enable_prefix_caching=False),
                        scheduler=SchedulerConfig(policy="vllm", auto_profile=False))


def text_prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    """``n`` prompts of ``length`` tokens: overlapping windows of ``PROMPT_TEXT``."""
    ids = tokenizer.encode(PROMPT_TEXT)
    step = max(1, (len(ids) - length) // max(n, 1))
    if len(ids) < length + step * (n - 1):
        raise ValueError(f"the prompt text has {len(ids)} tokens, too few for {n} prompts "
                         f"of {length}")
    return [ids[i * step:i * step + length] for i in range(n)]


def timed_generate(engine, prompts: list[list[int]], output_len: int
                   ) -> tuple[float, list[list[int]]]:
    """(seconds, each prompt's greedy tokens): exactly ``output_len`` tokens each."""
    from fbjax.sched.request import SamplingParams

    sampling = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    outputs = engine.generate(prompts, sampling)
    return time.perf_counter() - start, [o.token_ids for o in outputs]


def first_difference(a: list[list[int]], b: list[list[int]]) -> tuple[int, int] | None:
    """(sequence, token position) of the first difference, None when equal."""
    for s, (x, y) in enumerate(zip(a, b, strict=True)):
        if x != y:
            return s, next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q),
                           min(len(x), len(y)))
    return None


def build_engines(check: Check, impls: tuple[str, ...]) -> tuple[dict, dict[str, float]]:
    """One engine per implementation on stage 4's ladder, and its start-up seconds."""
    from fbjax.engine.engine import LLMEngine

    engines, startup = {}, {}
    for impl in impls:
        start = time.perf_counter()
        config = engine_config(check.plan, impl, check.plan.engine_buckets)
        engines[impl] = LLMEngine(config, loaded=check.loaded)
        startup[impl] = time.perf_counter() - start
        print(f"  {impl}: {len(config.buckets.pairs())} buckets compiled in "
              f"{startup[impl]:.1f} s", flush=True)
    return engines, startup


def run_streams(plan: Plan, engines: dict, prompts: list[list[int]]
                ) -> tuple[list[dict[str, Any]], dict[int, dict[str, Any]]]:
    """For each stream count: every engine's output tokens/s (after a warm-up run of the
    same batch) and how many greedy outputs the Pallas one shares with the reference."""
    runs, greedy = [], {}
    for n in plan.streams:
        tokens: dict[str, list[list[int]]] = {}
        for impl, engine in engines.items():
            timed_generate(engine, prompts[:n], plan.output_len)  # warm-up
            seconds, tokens[impl] = timed_generate(engine, prompts[:n], plan.output_len)
            rate = n * plan.output_len / seconds
            runs.append({"streams": n, "impl": impl, "seconds": seconds, "tok_s": rate})
            print(f"  {n} streams, {impl}: {rate:.1f} output tok/s", flush=True)
        ours, ref = tokens[plan.pallas], tokens["reference"]
        greedy[n] = {"equal": sum(x == y for x, y in zip(ours, ref, strict=True)), "of": n,
                     "first_difference": first_difference(ours, ref)}
    return runs, greedy


def engine_table(runs: list[dict[str, Any]], greedy: dict[int, dict[str, Any]]) -> str:
    rate = {(r["streams"], r["impl"]): r["tok_s"] for r in runs}
    lines = ["| streams | impl | output tok/s | vs reference | greedy outputs equal |",
             "|---:|---|---:|---:|---|"]
    for r in runs:
        g = greedy[r["streams"]]
        lines.append(f"| {r['streams']} | {r['impl']} | {r['tok_s']:.1f} "
                     f"| {r['tok_s'] / rate[(r['streams'], 'reference')]:.2f}x "
                     f"| {g['equal']}/{g['of']} |")
    return "\n".join(lines)


def stage_engine(check: Check, limit_s: float) -> Done:
    """Not bounded by ``limit_s``: compiling cannot be cut short (the watchdog can)."""
    plan = check.plan
    if plan.model_note:
        print(f"  note: {plan.model_note}", flush=True)
    with jax.default_matmul_precision(FLAGS.matmul_precision):
        engines, startup = build_engines(check, (plan.pallas, "reference"))
        prompts = text_prompts(check.loaded.tokenizer, max(plan.streams), plan.prompt_len)
        runs, greedy = run_streams(plan, engines, prompts)
    rate = {(r["streams"], r["impl"]): r["tok_s"] for r in runs}
    all_equal = all(g["equal"] == g["of"] for g in greedy.values())
    summary = f"{plan.model}: " + "; ".join(
        f"{n} streams {rate[(n, plan.pallas)]:.0f} tok/s "
        f"({rate[(n, plan.pallas)] / rate[(n, 'reference')]:.2f}x ref)" for n in plan.streams
    ) + f"; greedy equal: {'yes' if all_equal else 'NO'}"
    buckets = plan.engine_buckets
    header = (f"{plan.model_note + '. ' if plan.model_note else ''}"
              f"{plan.model}, {plan.dtype}, matmul precision {FLAGS.matmul_precision}; "
              f"{plan.prompt_len}-token prompts, {plan.output_len} greedy tokens each; "
              f"buckets {buckets.token_buckets} x {buckets.seq_buckets}; start-up "
              + ", ".join(f"{k} {v:.0f} s" for k, v in startup.items()))
    figures = {"model": plan.model, "model_note": plan.model_note, "dtype": plan.dtype,
               "matmul_precision": FLAGS.matmul_precision,
               "buckets": [list(buckets.token_buckets), list(buckets.seq_buckets)],
               "prompt_len": plan.prompt_len, "output_len": plan.output_len,
               "startup_s": startup, "runs": runs,
               "greedy": {str(k): v for k, v in greedy.items()}}
    done = Done(summary, figures, header + "\n\n" + engine_table(runs, greedy))
    if not all_equal:
        where = {n: g["first_difference"] for n, g in greedy.items() if g["first_difference"]}
        raise StageFailed(f"greedy outputs differ from the reference's (streams: (sequence, "
                          f"token) of the first difference): {where}", done)
    return done


# ------------------------------------------------------------------------ 5. the profile


def stage_profile(check: Check, limit_s: float) -> Done:
    from fbjax.engine.engine import LLMEngine
    from fbjax.profiling.measure import plot_profile, record_profile
    from fbjax.profiling.store import default_profile_path

    plan = check.plan
    start = time.monotonic()
    engine = LLMEngine(engine_config(plan, "auto", plan.buckets), loaded=check.loaded)
    built = time.monotonic() - start
    print(f"  engine ({resolve_impl('auto')}, {len(plan.buckets.pairs())} buckets) compiled "
          f"in {built:.1f} s", flush=True)
    # what is left of the stage's time, less a little for the fit and the plot
    measure_s = max(2.0, limit_s - built - (3 if plan.rehearse else 8))
    settings = dataclasses.replace(plan.grid, time_limit_s=measure_s)
    rec = record_profile(engine, settings, "scripts/device_check.py")
    name = default_profile_path(engine.device_key, engine.model_key).name
    path = check.out / "profiles" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    rec.model.save(path)
    check.profile_engine, check.profile_path = engine, path
    h = rec.model.heldout
    error = (f"held-out MAPE {h.mape * 100:.1f}%, p95 abs error {h.p95_abs_ms:.3f} ms "
             f"over {h.num_points} points" if h else "no held-out points")
    plot = check.out / "profile_fit.png"
    try:
        plot_profile(rec.model, rec.measurements, str(plot), f"{name}: {error}")
    except Exception as e:  # noqa: BLE001 - a missing plot does not void the profile
        print(f"  (no plot: {e})", flush=True)
    copy = f"cp {path} fbjax/configs/profiles/{name}"
    summary = (f"{name}: {len(rec.measurements)}/{rec.planned} points in {rec.seconds:.0f} s, "
               f"{error}")
    details = "\n".join([
        f"{resolve_impl('auto')} engine of {plan.model} ({plan.dtype}), buckets "
        f"{plan.buckets.token_buckets} x {plan.buckets.seq_buckets}, compiled in "
        f"{built:.0f} s; {summary}.", "",
        "To ship it (the engine and `python -m fbjax.serve` on this device then find it; "
        "FairBatching needs it):", "", "```", copy, "```"])
    figures = {"path": str(path), "name": name, "points": len(rec.measurements),
               "planned": rec.planned, "measure_s": rec.seconds, "compile_s": built,
               "heldout_mape": h.mape if h else None,
               "heldout_p95_abs_ms": h.p95_abs_ms if h else None,
               "plot": plot.name if plot.exists() else None, "copy_command": copy}
    print(f"  profile written to {path}\n  to ship it: {copy}", flush=True)
    return Done(summary, figures, details)


# ------------------------------------------------------------------------- 6. the replay


def replay_trace(plan: Plan):
    """(the trace of stage 6, a note on where it came from): the named trace where the
    shared data is here, else a synthetic one long enough for the slice."""
    from fbjax.resources import SharedDataNotFound
    from fbjax.traces import TraceError, load_trace, synthetic

    try:
        return load_trace(plan.trace), f"trace {plan.trace}"
    except (SharedDataNotFound, TraceError, FileNotFoundError, ValueError) as e:
        rate, end = 4.0, plan.slice_start_s + plan.slice_s
        trace = synthetic(int(rate * end * 1.1) + 10, rate, (16, 2048), (8, 512),
                          burstiness=0.5, seed=0, name="synthetic-gamma0.5")
        return trace, (f"{trace.name} (Gamma arrivals, burstiness 0.5; {plan.trace} is not "
                       f"here: {str(e).splitlines()[0][:120]})")


def stage_replay(check: Check, limit_s: float) -> Done:
    from fbjax.profiling.store import load_profile
    from fbjax.replay.engine import calibrated_slice, compare_policies, fit_lengths
    from fbjax.sim.protocol import setting_for

    if check.profile_engine is None or check.profile_path is None:
        raise StageSkipped("no profile: stage 5 did not produce one")
    plan, engine = check.plan, check.profile_engine
    start = time.monotonic()
    trace, source = replay_trace(plan)
    end = plan.slice_start_s + plan.slice_s
    fitted, _ = fit_lengths(trace.sliced(plan.slice_start_s, end), engine.max_model_len)
    setting = setting_for(SLO_SETTING, load_profile(check.profile_path), fitted)
    print(f"  {source}; {setting.describe()}", flush=True)
    run = calibrated_slice(trace, plan.slice_start_s, plan.slice_s, "auto", plan.calibrate_s,
                           setting.slo, str(check.profile_path), engine=engine)
    policies = ("sarathi", "fairbatching")
    # real time: each policy's arrivals, then its backlog drains (half as long again)
    left = limit_s - (time.monotonic() - start)
    max_wall_s = max(1.0, left / len(policies) / 1.5)
    result = compare_policies(run, setting.slo, policies=policies,
                              sarathi_budget=setting.deployed_budget, max_wall_s=max_wall_s,
                              log=lambda line: print(f"  {line}", flush=True))
    details = "\n".join([
        f"{source}; slice {plan.slice_start_s:.0f}-{end:.0f} s, {run.scaling.describe()}, "
        f"run at rate scale {result.rate_scale:.2f} (1.3 x Sarathi's simulated capacity) for "
        f"its first {max_wall_s:.0f} s: {len(result.trace)} requests; {setting.describe()}; "
        f"profile calibrated on {plan.calibrate_s:.0f} s of the trace before the slice.", "",
        result.table(), "", result.headline()])
    figures = {"trace": result.trace.name, "source": source, "slo_setting": SLO_SETTING,
               "slo": setting.slo.describe(), "sarathi_budget": setting.deployed_budget,
               "rate_scale": result.rate_scale, "max_wall_s": max_wall_s,
               "requests": len(result.trace), "results": result.figures}
    return Done(result.headline(), figures, details)


# ------------------------------------------------------------------------------ running

# name -> (title, function)
STAGES: dict[str, tuple[str, Callable[[Check, float], Done]]] = {
    "environment": ("Environment", stage_environment),
    "conformance": ("Kernel conformance, compiled for the device", stage_conformance),
    "kernels": ("Kernels: Pallas vs the XLA reference", stage_kernels),
    "engine": ("Engine: Pallas vs reference, default model", stage_engine),
    "profile": ("Latency profile of the device", stage_profile),
    "replay": ("FairBatching vs Sarathi on the real engine", stage_replay),
}


def stage_limit(check: Check, name: str, later: list[str]) -> tuple[float, float]:
    """(seconds the stage needs at least, seconds it may take): its planned share, less
    what the stages after it need at least."""
    budgets = BUDGETS[check.rehearse]
    need, planned = budgets[name]
    reserve = sum(budgets[n][0] for n in later)
    return need, max(need, min(planned, check.remaining() - reserve))


def run_stage(check: Check, name: str, later: list[str]) -> None:
    result = check.results[name]
    need, limit = stage_limit(check, name, later)
    if check.remaining() < need:
        result.status = "skipped"
        result.summary = (f"needs at least {need:.0f} s of the budget, "
                          f"{max(0.0, check.remaining()):.1f} s left")
        check.save()
        return
    print(f"\n== {list(STAGES).index(name) + 1}. {STAGES[name][0]} (up to {limit:.0f} s; "
          f"{check.remaining():.0f} s of the budget left) ==", flush=True)
    result.status = "running"
    check.save()
    start = time.monotonic()
    try:
        done = STAGES[name][1](check, limit)
        result.status = "ok"
    except StageSkipped as e:
        done, result.status = Done(str(e), {}), "skipped"
    except StageFailed as e:
        done, result.status, result.error = e.done, "failed", str(e)
    except Exception as e:  # noqa: BLE001 - recorded; the next stage runs
        done, result.status = Done(f"{type(e).__name__}", {}), "failed"
        result.error = "".join(traceback.format_exception(e))[-4000:]
    with check.lock:
        result.seconds = time.monotonic() - start
        result.summary, result.figures, result.details = done.summary, done.figures, done.details
        check.save()
    print(f"-> {result.status} in {result.seconds:.1f} s: {result.summary}", flush=True)
    if result.error:
        print(f"   error: {result.error.strip().splitlines()[-1]}", flush=True)


def finish(check: Check) -> None:
    print(f"\n{summary_table(list(check.results.values()))}\n", flush=True)
    print(f"results: {check.out / 'results.json'}, report: "
          f"{check.out / (check.device_name + '.md')} (commit it as "
          f"docs/results/devices/{check.device_name}.md)", flush=True)


def start_watchdog(check: Check) -> threading.Timer:
    """At the end of the budget: the running stage is recorded as stopped, the results
    are written and the process exits (3), whatever the stage was doing."""
    def expire() -> None:
        with check.lock:
            for r in check.results.values():
                if r.status == "running":
                    r.status, r.seconds = "failed", check.elapsed()
                    r.error = f"stopped: the budget of {check.budget_s:.0f} s ran out"
                elif r.status == "pending":
                    r.status, r.summary = "skipped", "the budget ran out"
            if check.child is not None:
                kill_group(check.child)
            check.save()
            finish(check)
        os._exit(3)

    timer = threading.Timer(max(0.0, check.remaining()), expire)
    timer.daemon = True
    timer.start()
    return timer


def main(argv: list[str]) -> int:
    del argv
    if FLAGS.rehearse:  # this process and its children
        os.environ["JAX_PLATFORMS"] = "cpu"
        jax.config.update("jax_platforms", "cpu")
    if FLAGS.probe_to:
        Path(FLAGS.probe_to).write_text(json.dumps(environment_facts(), indent=1) + "\n")
        return 0
    if not FLAGS.out:
        print("error: --out is required", file=sys.stderr)
        return 2
    unknown = sorted(set(FLAGS.stages or ()) - set(STAGES))
    if unknown:
        print(f"error: unknown --stages {unknown}; choose from {list(STAGES)}", file=sys.stderr)
        return 2
    names = [n for n in STAGES if not FLAGS.stages or n in FLAGS.stages]
    out = Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, FLAGS.budget_s or (90.0 if FLAGS.rehearse else 480.0), FLAGS.rehearse)
    for name in STAGES:
        if name not in names:
            check.results[name].status, check.results[name].summary = "skipped", "not in --stages"
    check.save()
    watchdog = start_watchdog(check)
    code = 0
    for i, name in enumerate(names):
        if check.plan is None and name != "environment":
            try:  # what the device is: stage 1's answer, else this process asks JAX
                check.plan = make_plan(check.env.get("platform") or jax.default_backend())
            except ValueError as e:
                print(f"error: {e}", file=sys.stderr)
                for later in names[i:]:
                    check.results[later].status, check.results[later].summary = "skipped", str(e)
                code = 2
                break
        run_stage(check, name, names[i + 1:])
    watchdog.cancel()
    check.save()
    finish(check)
    failed = any(r.status == "failed" for r in check.results.values())
    return code or int(failed)


if __name__ == "__main__":
    app.run(main)
