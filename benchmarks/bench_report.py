"""The Markdown record of benchmarks/bench.py: its result rows and how they are written out."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from bench_measure import MachineInfo
from bench_steps import REFERENCE_NOTES, BenchConfig

__all__ = ["AugmentRow", "BenchReport", "EvalRow", "StepRow", "arch_label", "machine_busy", "to_markdown"]


@dataclass
class StepRow:
    """One method at one batch size: our step next to the reference step."""

    method: str
    student: str
    teacher: str  # "-" for methods without a teacher
    batch: int
    ours_ips: float  # images per second, batch / median step time
    ref_ips: float
    ours_peak_mib: float
    ref_peak_mib: float
    ours_flops: int  # FLOPs of one step (FlopCounterMode: matmuls and convolutions, fwd + bwd)
    ref_flops: int
    ours_flops_per_s: float  # ours_flops / median step time
    peak_fraction: float  # ours_flops_per_s / the device's peak
    ratio: float  # ours / reference speed: median over iterations of reference time / our time (paired)
    ratio_q1: float  # quartiles of those per-iteration ratios
    ratio_q3: float
    cpu_time_ratio: float  # reference / our median process CPU time per step (CPU device: robust to other load)
    load: float = float("nan")  # 1-min load average when the row finished
    control: bool = False  # an A/A row: "ref" is a second copy of our step (measures the noise)


@dataclass
class AugmentRow:
    """Augmentation alone: images/s, and its time as a share of one of our steps."""

    name: str
    batch: int
    ips: float
    share: float | None  # augmentation time / the step named in BenchReport.share_of


@dataclass
class EvalRow:
    """An evaluation attack on the student: images/s at one batch size."""

    attack: str
    model: str
    batch: int
    samples: int
    ips: float
    flops_per_s: float | None  # None where not counted (AutoAttack)
    peak_fraction: float | None


@dataclass
class BenchReport:
    """Everything one run of benchmarks/bench.py measured; `to_markdown` writes it out."""

    config: BenchConfig
    machine: MachineInfo
    rows: list[StepRow] = field(default_factory=list)
    augment: list[AugmentRow] = field(default_factory=list)
    share_of: str = ""  # the step the augmentation shares are relative to
    evals: list[EvalRow] = field(default_factory=list)
    eval_note: str = ""
    command: str = ""  # the command line that produced the report


def arch_label(arch: str, width: int | None) -> str:
    """An architecture as the record names it: the name, with its width where one was set."""
    return arch if width is None else f"{arch}-w{width}"


def machine_busy(m: MachineInfo) -> bool:
    """Whether other processes competed for the cores the torch threads needed: the load before
    the run, or the load at its end less our own threads, plus our threads exceeds the cores."""
    if m.device != "cpu":
        return False
    others_at_end = m.load_end - m.threads if math.isfinite(m.load_end) else 0.0
    return max(m.load_start, others_at_end) + m.threads > m.cores + 0.5


def _flops_unit(device: str) -> tuple[float, str]:
    return (1e12, "TFLOP/s") if device == "cuda" else (1e9, "GFLOP/s")


def to_markdown(report: BenchReport) -> str:
    """The record: the machine, the shapes, the step table, augmentation, evaluation, notes."""
    cfg, m = report.config, report.machine
    scale, unit = _flops_unit(m.device)
    # Every student the rows cover (--student a,b), in order; the config names the first.
    students = ", ".join(dict.fromkeys(r.student for r in report.rows if not r.control)) or arch_label(
        cfg.student, cfg.student_width
    )
    out = [
        "# afm-ray performance record",
        "",
        *([f"Command: `{report.command}`", ""] if report.command else []),
        f"Machine: {m.name}, {m.cores} cores, {m.threads} torch threads, torch {m.torch_version}, "
        f"Python {m.python_version}, {m.date}; 1-min load average {m.load_start:.2f} at start, "
        f"{m.load_end:.2f} at end.",
        "",
        f"Shapes: student {students}, teacher "
        f"{arch_label(cfg.teacher, cfg.teacher_width)}, input {cfg.channels}x{cfg.image_size}x{cfg.image_size}, "
        f"{cfg.num_classes} classes, PGD-{cfg.steps} linf eps {cfg.eps:.4g} step {cfg.step_size:.4g}; our "
        f"augmentation {cfg.policy} on {cfg.device}, amp {cfg.amp}, "
        f"channels_last {'on' if cfg.channels_last else 'off'}, "
        f"compile {'on' if cfg.compile else 'off'}. Median of {cfg.iters} iterations after {cfg.warmup} warm-up, "
        f"ours and reference interleaved. Reference: fp32, DataLoader with {cfg.ref_workers} workers, attack "
        f"gradients by {'loss.backward()' if cfg.ref_attack_grad == 'backward' else 'torch.autograd.grad'}.",
        "",
        f"Device peak: {m.peak_flops / scale:.4g} {unit} ({m.peak_source}). Measured: "
        + ", ".join(f"{op} {v / scale:.4g} {unit}" for op, v in m.measured_flops.items())
        + ".",
        f"Peak memory: {m.memory_method}.",
        "",
    ]
    if machine_busy(m):
        out += [
            f"**Busy machine**: the load average ({m.load_start:.2f} at start, {m.load_end:.2f} at end) "
            f"plus {m.threads} torch threads exceeds the {m.cores} cores, so other processes shared them: "
            "absolute numbers are low and noisy. The ratios come from interleaved pairs and hold better; "
            "the CPU-time ratio does not count waiting for a core at all.",
            "",
        ]
    cpu = m.device == "cpu"
    if report.rows:
        out += [
            "## Training step",
            "",
            "| method | student / teacher | batch | ours img/s | reference img/s | ours / ref |"
            + (" ours / ref by CPU time |" if cpu else "")
            + f" ours peak MiB | ref peak MiB | ours GFLOP/step | ref GFLOP/step | ours {unit} | % of peak |"
            + (" load |" if cpu else ""),
            "|---|---|---:|---:|---:|---:|"
            + ("---:|" if cpu else "")
            + "---:|---:|---:|---:|---:|---:|"
            + ("---:|" if cpu else ""),
        ]
        for r in report.rows:
            out.append(
                f"| {r.method} | {r.student} / {r.teacher} | {r.batch} | {r.ours_ips:.1f} | {r.ref_ips:.1f} | "
                f"{r.ratio:.2f} ({r.ratio_q1:.2f}-{r.ratio_q3:.2f}) |"
                + (f" {r.cpu_time_ratio:.2f} |" if cpu else "")
                + f" {r.ours_peak_mib:.0f} | {r.ref_peak_mib:.0f} | "
                f"{r.ours_flops / 1e9:.2f} | {r.ref_flops / 1e9:.2f} | {r.ours_flops_per_s / scale:.3g} | "
                f"{100 * r.peak_fraction:.1f} |" + (f" {r.load:.2f} |" if cpu else "")
            )
        method_rows = [r for r in report.rows if not r.control]
        slower = [f"{r.method} (batch {r.batch})" for r in method_rows if r.ratio_q3 < 1]
        unclear = [f"{r.method} (batch {r.batch})" for r in method_rows if r.ratio_q1 <= 1 <= r.ratio_q3]
        noise = {
            r.batch: max(abs(r.ratio_q1 - 1), abs(r.ratio - 1), abs(r.ratio_q3 - 1)) for r in report.rows if r.control
        }
        within = [
            f"{r.method} (batch {r.batch})"
            for r in method_rows
            if r.batch in noise and abs(r.ratio - 1) <= noise[r.batch]
        ]
        out += [
            "",
            "ours / ref: each iteration times our step and the reference step back to back (the order "
            "alternating); the ratio is the median over iterations of reference time / our time, in "
            "brackets its quartiles. images/s columns are batch / median time of each. The A/A control "
            "times our step against an identical copy of itself: how far its ratio lands from 1 is "
            "the noise of this run."
            + (
                " By CPU time: reference / our median process CPU seconds per step (all threads, spinning "
                "included; DataLoader workers not counted). load: 1-min load average when the row "
                "finished (our own threads included)."
                if cpu
                else ""
            ),
            "",
            "Slower than the reference (upper quartile of the ratio < 1): "
            + (", ".join(slower) if slower else "none")
            + ".",
            "Not distinguishable from the reference (quartiles straddle 1): "
            + (", ".join(unclear) if unclear else "none")
            + ".",
            *(
                [
                    f"Within the noise of the A/A control (|ratio - 1| <= "
                    f"{', '.join(f'{v:.2f} at batch {b}' for b, v in noise.items())}, the control's largest "
                    "distance from 1 among its median and quartiles): "
                    + (", ".join(within) if within else "none")
                    + "."
                ]
                if noise
                else []
            ),
            "",
        ]
    if report.augment:
        out += [
            "## Augmentation alone",
            "",
            f"| augmentation | batch | img/s | share of {report.share_of or 'a step'} |",
            "|---|---:|---:|---:|",
        ]
        for a in report.augment:
            share = "-" if a.share is None else f"{100 * a.share:.1f}%"
            out.append(f"| {a.name} | {a.batch} | {a.ips:.0f} | {share} |")
        out.append("")
    if report.evals:
        out += [
            "## Evaluation attacks",
            "",
            f"| attack | model | batch | images | img/s | {unit} | % of peak |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for e in report.evals:
            fl = "-" if e.flops_per_s is None else f"{e.flops_per_s / scale:.3g}"
            frac = "-" if e.peak_fraction is None else f"{100 * e.peak_fraction:.1f}"
            out.append(f"| {e.attack} | {e.model} | {e.batch} | {e.samples} | {e.ips:.1f} | {fl} | {frac} |")
        out += ["", report.eval_note, ""]
    out += [
        "## Notes",
        "",
        "- images/s = batch / median step time. A step is everything from drawing the batch to the "
        "optimizer step: ours draws from the device-resident DeviceBatchLoader and augments with "
        "BatchAugment on the device; the reference draws from a DataLoader that augments per sample "
        "on the host, then copies to the device.",
        "- GFLOP/step: torch.utils.flop_counter.FlopCounterMode over one step (matmuls and convolutions, "
        "forward and backward); achieved FLOP/s = that count / the median step time. The reference's "
        "extra FLOPs are its parameter gradients in every attack step and the forwards listed below.",
        "- The reference computes the same math as our method (objective, steps, start, eval-mode "
        "student during the attack, outer loss); what it computes beyond ours, per method:",
    ]
    methods = dict.fromkeys(r.method for r in report.rows if not r.control)
    out += [f"  - {name}: {REFERENCE_NOTES[name]}" for name in methods]
    return "\n".join(out) + "\n"
