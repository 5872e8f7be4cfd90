"""The performance record: `python benchmarks/bench.py [--eval]`, run from the repository root.

For each method it times one training step as `train_fn_per_worker` runs it (device-resident
batches, `BatchAugment` on the device, the method's shared `pgd`, SGD) next to a plain
reference step written the way research code usually is (fp32; a `DataLoader` whose
dataset crops and flips each sample in `__getitem__`; the PGD loop written out inline with
`loss.backward()` and a `.item()` per attack step; teacher logits recomputed where the
official code recomputes them). Both run in the same process on the same machine,
interleaved iteration by iteration so background load hits both alike; the table reports
images/s of each, their ratio, peak memory, FLOPs per step (FlopCounterMode, counted once)
and the achieved fraction of the device's peak. `--eval` adds the evaluation attacks
(PGD-20, AutoAttack on a small subset).

The reference computes the same math as the method (same attack objective, steps, start,
student mode during the attack, outer loss) and differs only where research code differs:
host-side per-sample augmentation, parameter gradients in every attack step (`backward`;
`--ref-attack-grad input` gives the official TRADES/RSLAD/ARD/AdaAD `autograd.grad` style),
a host sync per attack step, and the extra forwards of the official code (REFERENCE_NOTES in
bench_steps.py).
Its teacher is frozen (requires_grad False), which is kinder to the reference than ARD's
official code, where the KL target is not detached and teacher gradients are computed.

What the reference step shares with afm_ray, and what it keeps apart on purpose:

- Independent, because it is what the comparison measures (shared, it would inherit whatever
  our fast path optimises): the input pipeline (host crop/flip per sample, then a copy to the
  device); the PGD loop written out as research code writes it; the attack objectives as the
  official codes write them, with the forwards they spend in every attack step; the forwards
  after the attack, in the official order, including those our methods skip; fp32, NCHW and
  eager throughout (no autocast, channels_last or compile).
- Shared, because it is math that must not drift and costs nothing in plainness: the outer
  losses, afm_ray.methods' pure functions of logits (`rslad_loss`, `ard_loss`, ...; TRADES adds
  `trades_loss`'s two terms from the same `soft_cross_entropy` and `kl_div`, since the official
  code runs one clean forward per term); each method's hyperparameters and random-start kind
  (`build_method`); the architectures (`build_model`). Within the benchmark, both steps also
  draw the same synthetic images and use the same SGD settings.
- Checked: tests/test_bench.py asserts that the reference's attack objectives (value and input
  gradient) and outer losses equal the methods' own on the same inputs, so the independent
  half cannot drift from the package's math unnoticed.

The code: bench_steps.py holds the two steps and their set-up, bench_measure.py the timing,
memory and FLOP measurements and the machine description, bench_report.py the Markdown record.

The measured record for the CPU machine is docs/bench_cpu.md (`python benchmarks/bench.py --eval`,
2 cores, small_cnn shapes, training's defaults bf16 + channels_last, one run at low load): ours /
reference 1.81 (PGD-AT) to 3.62 (AdaAD), AdvFunMatch 2.96; the A/A control put the run's noise
at +-6%. docs/defaults_cpu.md holds the switch-by-switch runs behind those defaults. The header
of each record names its machine and shapes.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from afm_ray.attacks import robust_predictions
from afm_ray.augment import BatchAugment
from afm_ray.config import RunConfig
from afm_ray.data import DeviceBatchLoader
from afm_ray.devices import amp_dtype_for
from afm_ray.eval_batch import choose_eval_batch_size
from afm_ray.methods import METHODS

# The sibling modules import as top-level names: Python puts a script's own folder on sys.path, an importer may not.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_measure import (
    CPU_MEMORY_FALLBACK,
    CPU_MEMORY_METHOD,
    CUDA_MEMORY_METHOD,
    MachineInfo,
    Timings,
    count_flops,
    device_peak_flops,
    machine_info,
    paired_ratio_quartiles,
    peak_memory,
    reset_rss_peak,
    sync,
    time_steps,
)
from bench_report import AugmentRow, BenchReport, EvalRow, StepRow, arch_label, to_markdown
from bench_steps import (
    BenchConfig,
    CropFlipDataset,
    build_models,
    cpu_defaults,
    cuda_defaults,
    cycle,
    make_our_step,
    make_reference_step,
    n_images,
    synthetic_images,
)

__all__ = [
    "AugmentRow",
    "BenchConfig",
    "BenchReport",
    "EvalRow",
    "MachineInfo",
    "StepRow",
    "bench_augment",
    "bench_eval",
    "bench_methods",
    "count_flops",
    "device_peak_flops",
    "machine_info",
    "main",
    "peak_memory",
    "Timings",
    "time_steps",
    "to_markdown",
]


# --------------------------------------------------------------------------------------------
# The benchmarks.


def bench_method(
    name: str,
    cfg: BenchConfig,
    student: nn.Module,
    teacher: nn.Module,
    device: torch.device,
    peak_flops: float,
    *,
    control: bool = False,
) -> StepRow:
    """Our step and the reference step of `name`, each on its own copy of `student`.

    control: time our step against an identical second copy of itself instead (an A/A test):
    its ratio's distance from 1 is the measurement noise of this run.
    """
    ours_student, ref_student = copy.deepcopy(student), copy.deepcopy(student)
    ours = make_our_step(name, cfg, ours_student, teacher, device)
    make_other = make_our_step if control else make_reference_step
    ref = make_other(name, cfg, ref_student, teacher, device)
    # FLOPs on an eager copy: FlopCounterMode does not see inside compiled graphs.
    eager = (
        ours
        if not cfg.compile
        else make_our_step(name, replace(cfg, compile=False), copy.deepcopy(student), teacher, device)
    )
    ours_flops, ref_flops = count_flops(eager), count_flops(ref)
    times = time_steps({"ours": ours, "ref": ref}, iters=cfg.iters, warmup=cfg.warmup, device=device)
    seconds = {k: v.median for k, v in times.items()}
    q1, ratio, q3 = paired_ratio_quartiles(times["ref"].wall, times["ours"].wall)
    ours_mem, _ = peak_memory(ours, device)
    ref_mem, _ = peak_memory(ref, device)
    has_teacher = METHODS[name].needs_teacher
    achieved = ours_flops / seconds["ours"]
    return StepRow(
        method=f"A/A control: {name} ours vs ours" if control else name,
        student=arch_label(cfg.student, cfg.student_width),
        teacher=arch_label(cfg.teacher, cfg.teacher_width) if has_teacher else "-",
        batch=cfg.batch_size,
        ours_ips=cfg.batch_size / seconds["ours"],
        ref_ips=cfg.batch_size / seconds["ref"],
        ours_peak_mib=ours_mem / 2**20,
        ref_peak_mib=ref_mem / 2**20,
        ours_flops=ours_flops,
        ref_flops=ref_flops,
        ours_flops_per_s=achieved,
        peak_fraction=achieved / peak_flops,
        ratio=ratio,
        ratio_q1=q1,
        ratio_q3=q3,
        cpu_time_ratio=times["ref"].median_cpu / times["ours"].median_cpu,
        load=os.getloadavg()[0],
        control=control,
    )


def bench_methods(
    cfg: BenchConfig,
    methods: Sequence[str],
    *,
    batch_sizes: Sequence[int] | None = None,
    peak_flops: float | None = None,
    control: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[StepRow]:
    """A StepRow per method and batch size (cfg.batch_size when batch_sizes is None), and with
    `control` a last A/A row per batch size: that method's step against a copy of itself."""
    device = torch.device(cfg.device)
    if peak_flops is None:
        peak_flops = device_peak_flops(device, cfg.amp)[0]
    rows = []
    for batch in batch_sizes or (cfg.batch_size,):
        bcfg = replace(cfg, batch_size=batch)
        student, teacher = build_models(bcfg, device)
        runs = [(name, False) for name in methods] + ([(control, True)] if control else [])
        for name, is_control in runs:
            row = bench_method(name, bcfg, student, teacher, device, peak_flops, control=is_control)
            rows.append(row)
            if progress is not None:
                progress(
                    f"{row.method:<12} batch {batch}: ours {row.ours_ips:9.1f} img/s, "
                    f"{'copy' if is_control else 'reference'} {row.ref_ips:9.1f} img/s, ratio {row.ratio:.2f}"
                )
    return rows


def bench_augment(
    cfg: BenchConfig,
    policies: Sequence[str] = ("crop_flip", "autoaugment+cutmix"),
    *,
    step_seconds: float | None = None,
) -> list[AugmentRow]:
    """BatchAugment alone per policy, and the reference's DataLoader (host crop+flip) alone."""
    device = torch.device(cfg.device)
    x_all, y_all = synthetic_images(n_images(cfg), cfg, cfg.seed)
    batches = cycle(DeviceBatchLoader(x_all, y_all, cfg.batch_size, device=device, seed=cfg.seed))
    steps: dict[str, Callable[[], object]] = {}
    for policy in policies:
        augment = BatchAugment(policy, image_shape=cfg.image_shape, num_classes=cfg.num_classes)
        steps[f"BatchAugment {policy} ({cfg.device})"] = lambda augment=augment: augment(
            *_labels_one_hot(next(batches), cfg.num_classes)
        )
    loader = DataLoader(
        CropFlipDataset(x_all, y_all),
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=cfg.ref_workers,
        persistent_workers=cfg.ref_workers > 0,
    )
    host = cycle(loader)
    steps[f"reference DataLoader crop_flip (host, {cfg.ref_workers} workers)"] = lambda: next(host)
    seconds = {k: v.median for k, v in time_steps(steps, iters=cfg.iters, warmup=cfg.warmup, device=device).items()}
    return [
        AugmentRow(name, cfg.batch_size, cfg.batch_size / s, None if step_seconds is None else s / step_seconds)
        for name, s in seconds.items()
    ]


def _labels_one_hot(batch: tuple[Tensor, Tensor], num_classes: int) -> tuple[Tensor, Tensor]:
    x, y = batch
    return x, F.one_hot(y, num_classes).float()


def bench_eval(
    cfg: BenchConfig, *, batch_size: int = 0, aa_samples: int = 64, peak_flops: float | None = None
) -> tuple[list[EvalRow], str]:
    """PGD-20 (median over cfg.iters batches) and AutoAttack standard (one run on `aa_samples`
    images) on an untrained student; labels are the model's own predictions, so every image is
    attacked. batch_size 0 = chosen as training runs choose it (afm_ray.eval_batch), for up to
    4096 images on CUDA and 1024 on CPU."""
    device = torch.device(cfg.device)
    model, _ = build_models(cfg, device)
    model.eval()
    if batch_size:
        batch, choice_note = batch_size, f"batch {batch_size}: set with --eval-batch-size"
    else:
        choice = choose_eval_batch_size(
            model, cfg.image_shape, device, n_images=4096 if device.type == "cuda" else 1024
        )
        batch, choice_note = choice.batch_size, choice.reason
    x = torch.rand(batch, *cfg.image_shape, device=device)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    label = arch_label(cfg.student, cfg.student_width)

    def pgd20() -> Tensor:
        return robust_predictions(model, x, y, attack="pgd20", eps=cfg.eps, batch_size=batch)

    flops = count_flops(pgd20)
    seconds = time_steps({"pgd20": pgd20}, iters=cfg.iters, warmup=cfg.warmup, device=device)["pgd20"].median
    rows = [
        EvalRow(
            "PGD-20",
            label,
            batch,
            batch,
            batch / seconds,
            flops / seconds,
            None if peak_flops is None else flops / seconds / peak_flops,
        )
    ]

    n = min(aa_samples, batch)
    sync(device)
    start = time.perf_counter()
    robust = robust_predictions(model, x[:n], y[:n], attack="aa", eps=cfg.eps, batch_size=batch, seed=cfg.seed)
    sync(device)
    aa_seconds = time.perf_counter() - start
    rows.append(EvalRow("AutoAttack standard", label, batch, n, n / aa_seconds, None, None))
    note = (
        f"Batch size (eval.batch_size 0, afm_ray.eval_batch): {choice_note}. "
        f"Untrained student, labels = its own predictions, so APGD-CE starts on every image; each later "
        f"attack (APGD-T, FAB-T, Square) runs only on the images still robust, and "
        f"{int(robust.sum())}/{n} were left at the end. A robust model keeps more images for the "
        "later attacks: read the AutoAttack row as an upper bound on throughput. AutoAttack is one "
        "timed run (no warm-up of its own); PGD-20 is the median of the iterations."
    )
    return rows, note


# --------------------------------------------------------------------------------------------
# CLI


def _parse_methods(text: str) -> list[str]:
    if text == "all":
        return list(METHODS)
    if text == "none":
        return []
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}, all, none")
    return names


def _parse_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 128,256") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers")
    return values


def _resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available")
    return torch.device(setting)


def _default_out(device: torch.device) -> str:
    if device.type != "cuda":
        return "docs/bench_cpu.md"
    short = re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name(device).lower().replace("nvidia", "")).strip("_")
    return f"docs/bench_{short}.md"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/bench.py",
        description="Images/s of one training step of each method next to a plain reference step, "
        "with peak memory and FLOP/s; writes a Markdown record. Unset options take the "
        "device's defaults (CPU: small_cnn on 1x28x28, batch 128, PGD-3; CUDA: ResNet-18 "
        "student, WRN-34-10 teacher, 3x32x32, batch 256, PGD-10).",
    )
    p.add_argument(
        "--student",
        help="resnet18 | mobilenet_v2 | small_cnn (any afm_ray.models name); "
        "comma-separated for several, e.g. resnet18,mobilenet_v2",
    )
    p.add_argument(
        "--student-width",
        type=int,
        help="width of the student (default: 16 for the CPU small_cnn, else the architecture's)",
    )
    p.add_argument("--teacher", help="wrn34_10 | resnet18 | small_cnn (any afm_ray.models name)")
    p.add_argument("--teacher-width", type=int, help="width of the teacher (default: 64 for the CPU small_cnn)")
    p.add_argument("--batch-sizes", type=_parse_ints, help="comma-separated, e.g. 128,256,512")
    p.add_argument("--steps", type=int, help="PGD steps of the training attack")
    p.add_argument("--image-size", type=int)
    p.add_argument("--channels", type=int, choices=(1, 3))
    p.add_argument("--eps", type=float, help="linf budget (default 0.3 grey, 8/255 RGB); step eps/4")
    p.add_argument("--methods", type=_parse_methods, default=list(METHODS), help="all | none | advfunmatch,rslad,...")
    p.add_argument(
        "--policy",
        default="crop_flip",
        help="our step's BatchAugment policy (default crop_flip, what the reference does)",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--amp",
        choices=("auto", "off", "bf16"),
        default="auto",
        help="bf16 autocast around our method call; auto = run.amp auto of training (bf16 on CUDA "
        "and on CPUs with native bf16). The reference is always fp32",
    )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=RunConfig.channels_last,
        help=f"our step in channels_last (default: run.channels_last's default, {RunConfig.channels_last})",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=RunConfig.compile,
        help=f"torch.compile our student (default: run.compile's default, {RunConfig.compile})",
    )
    p.add_argument("--iters", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: all cores)")
    p.add_argument("--ref-workers", type=int, help="DataLoader workers of the reference (default: CPU 0, CUDA 4)")
    p.add_argument(
        "--ref-attack-grad",
        choices=("backward", "input"),
        default="backward",
        help="reference attack gradient: loss.backward() (default) or autograd.grad w.r.t. x only",
    )
    p.add_argument("--eval", action="store_true", help="also time PGD-20 and AutoAttack on the student")
    p.add_argument(
        "--eval-batch-size", type=int, default=0, help="0 = chosen as training runs choose it (afm_ray.eval_batch)"
    )
    p.add_argument("--aa-samples", type=int, help="images for the AutoAttack timing (default: CPU 64, CUDA 512)")
    p.add_argument("--no-augment", action="store_true", help="skip the augmentation-alone rows")
    p.add_argument(
        "--control",
        default="funmatch",
        help="method of the A/A control row (our step against a copy of itself), or none",
    )
    p.add_argument("--out", help="Markdown file (default docs/bench_cpu.md or docs/bench_<gpu>.md)")
    return p


def config_from_args(args: argparse.Namespace, device: torch.device) -> tuple[BenchConfig, list[int]]:
    values = cpu_defaults() if device.type != "cuda" else cuda_defaults()
    given = {
        "student": args.student,
        "teacher": args.teacher,
        "steps": args.steps,
        "image_size": args.image_size,
        "channels": args.channels,
        "iters": args.iters,
        "warmup": args.warmup,
        "ref_workers": args.ref_workers,
    }
    values.update({k: v for k, v in given.items() if v is not None})
    # A width only carries over to the architecture it was chosen for.
    defaults = cpu_defaults() if device.type != "cuda" else cuda_defaults()
    for role in ("student", "teacher"):
        width = getattr(args, f"{role}_width")
        if width is not None:
            values[f"{role}_width"] = width
        elif values[role] != defaults[role]:
            values[f"{role}_width"] = None
    if args.eps is not None:
        values["eps"] = args.eps
    elif args.channels is not None:
        values["eps"] = 0.3 if values["channels"] == 1 else 8 / 255
    if args.compile and args.warmup is None:
        values["warmup"] = max(3, int(values["warmup"]))  # type: ignore[call-overload]
    batch_sizes = args.batch_sizes or [int(values["batch_size"])]  # type: ignore[arg-type]
    values["batch_size"] = batch_sizes[0]
    amp = "bf16" if amp_dtype_for(args.amp, device) is not None else "off"  # as training resolves run.amp
    cfg = BenchConfig(
        **values,
        policy=args.policy,
        device=str(device),
        amp=amp,  # type: ignore[arg-type]
        channels_last=args.channels_last,
        compile=args.compile,
        ref_attack_grad=args.ref_attack_grad,
    )
    return cfg, batch_sizes


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = _resolve_device(args.device)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    # One config per student; all share the teacher, shapes and switches.
    configs = [
        config_from_args(argparse.Namespace(**{**vars(args), "student": student}), device)
        for student in (args.student.split(",") if args.student else [None])
    ]
    cfg, batch_sizes = configs[0]
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    log(f"device {device}, torch.get_num_threads() = {torch.get_num_threads()}, batch sizes {batch_sizes}")

    machine = machine_info(device)
    peak, source, measured = device_peak_flops(device, cfg.amp)
    machine.peak_flops, machine.peak_source, machine.measured_flops = peak, source, measured
    machine.memory_method = (
        CUDA_MEMORY_METHOD
        if device.type == "cuda"
        else (CPU_MEMORY_METHOD if reset_rss_peak() else CPU_MEMORY_FALLBACK)
    )
    log(f"peak {peak / 1e9:.1f} GFLOP/s ({source})")

    report = BenchReport(
        config=cfg,
        machine=machine,
        command=" ".join(["python benchmarks/bench.py", *(sys.argv[1:] if argv is None else argv)]),
    )
    control = None if args.control == "none" else args.control
    if control is not None and control not in METHODS:
        raise SystemExit(f"error: --control {control!r} is not a method; use one of {', '.join(METHODS)} or none")
    for i, (student_cfg, _) in enumerate(configs):  # the A/A control once, after the first student
        report.rows += bench_methods(
            student_cfg,
            args.methods,
            batch_sizes=batch_sizes,
            peak_flops=peak,
            control=control if i == 0 else None,
            progress=log,
        )
    if not args.no_augment:
        reference_row = next(
            (r for r in report.rows if r.method == "advfunmatch" and r.batch == cfg.batch_size),
            report.rows[0] if report.rows else None,
        )
        step_s = None if reference_row is None else reference_row.batch / reference_row.ours_ips
        report.share_of = "" if reference_row is None else f"our {reference_row.method} step"
        report.augment = bench_augment(cfg, step_seconds=step_s)
    if args.eval:
        aa_samples = args.aa_samples or (512 if device.type == "cuda" else 64)
        report.evals, report.eval_note = bench_eval(
            cfg, batch_size=args.eval_batch_size, aa_samples=aa_samples, peak_flops=peak
        )
    machine.load_end = os.getloadavg()[0]
    if device.type == "cpu":
        # Measured again at the end, and the better of the two kept: on a shared machine one
        # measurement can land in a busy moment and understate the peak.
        peak_end, _, measured_end = device_peak_flops(device, cfg.amp)
        machine.measured_flops = {op: max(v, measured_end[op]) for op, v in measured.items()}
        if peak_end > peak:
            machine.peak_flops = peak_end
            for row in report.rows:
                row.peak_fraction = row.ours_flops_per_s / peak_end
            for e in report.evals:
                e.peak_fraction = None if e.flops_per_s is None else e.flops_per_s / peak_end

    text = to_markdown(report)
    out = Path(args.out or _default_out(device))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
