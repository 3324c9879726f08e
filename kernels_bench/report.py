"""Plots and the markdown report (docs/benchmarks.md) from saved results.

    python -m kernels_bench report        # re-render from kernels_bench/results/*/results.json
"""
from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

log = logging.getLogger(__name__)

LABELS = {"sparse": "(a) sparse (spark_me)", "masked_dense": "(b) masked-dense emulation", "dense": "(c) plain dense"}
PART_LABELS = {"encoder_fwd": "encoder forward", "encoder_fwd_bwd": "encoder forward+backward", "step": "whole training step"}
ANALYSIS = Path(__file__).with_name("analysis.md")


def _key(r: dict) -> tuple:
    return (r["model"], r["part"], r["batch"], r["size"], r.get("amp"), bool(r.get("channels_last")))


def option_labels(r: dict) -> str:
    """A sparse row's encoder options: ``+dense_stem`` where its first conv ran densely on
    the zero-filled image; ``+recompute`` where its blocks were recomputed in the backward,
    ``+recompute[1-2]`` where only those of its first two stages were; ``+cuda_graphs``
    where its forward+backward was replayed from a CUDA graph; else ``""``."""
    label = "+dense_stem" if r.get("dense_stem") else ""
    if r.get("grad_checkpointing"):
        stages = r.get("checkpoint_stages")
        label += "+recompute" if stages is None else "+recompute[1]" if stages == 1 else f"+recompute[1-{stages}]"
    if r.get("cuda_graphs"):
        label += "+cuda_graphs"
    return label


def _backend(r: dict) -> str:
    """A sparse row's conv backend and its :func:`option_labels`."""
    return (r.get("conv_impl") or "auto") + option_labels(r)


def _series(r: dict) -> str:
    """A row's line in plots and sweeps: the variant, and for (a) its conv backend."""
    return f"sparse[{_backend(r)}]" if r["variant"] == "sparse" else r["variant"]


def _plain(rows: list[dict]) -> list[dict]:
    return [r for r in rows if not r.get("amp") and not r.get("channels_last")]


def measured(results: dict) -> list[dict]:
    """The rows that produced a measurement (a case can fail with out of memory on GPU)."""
    return [r for r in results["rows"] if "error" not in r]


def plot(results: dict, out_dir: Path) -> list[Path]:
    """Time and memory against mask ratio, one figure per (model, part) at the main batch/size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan = results["plan"]
    rows = [r for r in _plain(measured(results)) if r["batch"] == plan["batch"] and r["size"] == plan["size"]]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["model"], r["part"])].append(r)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for (model, part), rs in sorted(groups.items()):
        masks = sorted({r["mask_ratio"] for r in rs if r["variant"] != "dense"})
        if len(masks) < 2:
            continue
        with_memory = all(r.get("peak_growth_mib") is not None for r in rs)
        fig, axes = plt.subplots(1, 2 if with_memory else 1, figsize=(10 if with_memory else 5, 3.6), squeeze=False)
        for series in sorted({_series(r) for r in rs}, key=lambda v: (list(LABELS).index(v.split("[")[0]), v)):
            variant = series.split("[")[0]
            vr = sorted((r for r in rs if _series(r) == series), key=lambda r: r["mask_ratio"])
            if not vr:
                continue
            if variant == "dense":  # does not depend on the mask: a flat line
                xs, t, m = masks, [vr[0]["median_s"]] * len(masks), [vr[0].get("peak_growth_mib")] * len(masks)
                style = "--"
            else:
                xs, t, m = [r["mask_ratio"] for r in vr], [r["median_s"] for r in vr], [r.get("peak_growth_mib") for r in vr]
                style = "-o"
            label = LABELS[variant] + (series[len(variant):] if variant == "sparse" else "")
            axes[0][0].plot(xs, t, style, label=label)
            if with_memory:
                axes[0][1].plot(xs, m, style, label=label)
        axes[0][0].set(xlabel="mask ratio", ylabel="seconds (median)", title=f"{model}: {PART_LABELS[part]}")
        axes[0][0].set_ylim(bottom=0)
        if with_memory:
            kind = "GPU max allocated" if rs[0]["memory_kind"].startswith("cuda") else "peak RSS growth"
            axes[0][1].set(xlabel="mask ratio", ylabel=f"MiB ({kind})", title="memory")
            axes[0][1].set_ylim(bottom=0)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{model}_{part}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _fmt(x: Optional[float], spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def _baseline(rows: list[dict], variant: str, like: dict) -> Optional[dict]:
    """The fastest ``variant`` row at ``like``'s model, part, batch, size and precision
    (on GPU the dense baselines also run channels_last: the faster layout is the baseline)."""
    same = [r for r in rows if r["variant"] == variant and (r["model"], r["part"], r["batch"], r["size"], r.get("amp"))
            == (like["model"], like["part"], like["batch"], like["size"], like.get("amp"))]
    return min(same, key=lambda r: r["median_s"]) if same else None


def _sanity_text(s: dict) -> str:
    name = s["model"] + (f"[{s['conv_impl']}]" if s.get("conv_impl", "auto") != "auto" else "")
    if not s.get("passed", True):
        return f"{name} FAILED, its rows left out ({s.get('error', '')})"
    return f"{name} features {max(s['feature_rel_err']):.1e}, loss {s['loss_rel_err']:.1e}"


def headline(results: dict) -> list[dict]:
    """Each sparse row at the headline mask (one per backend and precision) against (b) and
    (c) at the same precision, with a/b for time and memory."""
    plan = results["plan"]
    rows = [r for r in measured(results) if r["variant"] == "dense" or r["mask_ratio"] == 0.6]
    sparse = [r for r in rows if r["variant"] == "sparse"]
    order = {k: i for i, k in enumerate(PART_LABELS)}
    sparse.sort(key=lambda r: (r["model"], order[r["part"]], (r["batch"], r["size"]) != (plan["batch"], plan["size"]),
                               r["batch"], r["size"], r.get("amp") or "", r.get("conv_impl") or "auto",
                               bool(r.get("dense_stem")), bool(r.get("cuda_graphs")), bool(r.get("grad_checkpointing")),
                               r.get("checkpoint_stages") or 99))
    out = []
    for a in sparse:
        b, c = _baseline(rows, "masked_dense", a), _baseline(rows, "dense", a)
        out.append({
            "model": a["model"], "part": a["part"], "batch": a["batch"], "size": a["size"],
            "backend": _backend(a), "setting": a.get("amp") or "fp32",
            "b_layout": b and ("channels_last" if b.get("channels_last") else "NCHW"),
            "a_img_s": a["images_per_s"], "b_img_s": b and b["images_per_s"], "c_img_s": c and c["images_per_s"],
            "a_mib": a.get("peak_growth_mib"), "b_mib": b and b.get("peak_growth_mib"), "c_mib": c and c.get("peak_growth_mib"),
            "time_a_over_b": b and a["median_s"] / b["median_s"],
            "mem_a_over_b": b and a.get("peak_growth_mib") and b.get("peak_growth_mib")
            and a["peak_growth_mib"] / b["peak_growth_mib"],
        })
    return out


# Issue #11's GPU targets (batch 128, 224 px, mask 0.6, bf16, dense baselines in channels_last).
GPU_TARGETS = (
    ("encoder forward+backward time, a/b (bf16)", "encoder_fwd_bwd", "time", 0.5),
    ("encoder forward+backward memory, a/b (bf16)", "encoder_fwd_bwd", "mem", 0.5),
    ("whole step time, a/b (bf16)", "step", "time", 0.92),
    ("whole step memory, a/b (bf16)", "step", "mem", 0.75),
)


def gpu_targets(results: dict) -> list[dict]:
    """Issue #11's GPU targets per model and sparse backend, measured against their bound."""
    head = [h for h in headline(results) if h["setting"] == "bf16" and (h["batch"], h["size"]) == (128, 224)]
    rows = measured(results)
    out = []
    for h in head:
        for label, part, what, bound in GPU_TARGETS:
            if h["part"] == part:
                value = h["time_a_over_b" if what == "time" else "mem_a_over_b"]
                out.append({"model": h["model"], "backend": h["backend"], "target": label, "bound": f"<= {bound}",
                            "value": value, "met": value is not None and value <= bound})
        if h["part"] == "step":  # against the official recipe as shipped: fp32 masked-dense, NCHW
            official = [r for r in rows if r["variant"] == "masked_dense" and r["part"] == "step" and not r.get("amp")
                        and not r.get("channels_last") and (r["model"], r["batch"], r["size"]) == (h["model"], 128, 224)]
            value = official and h["a_img_s"] / official[0]["images_per_s"]
            out.append({"model": h["model"], "backend": h["backend"], "target": "whole step images/s vs the official fp32 masked-dense",
                        "bound": ">= 2.5", "value": value or None, "met": bool(value) and value >= 2.5})
    return out


def scaling(results: dict) -> list[dict]:
    """Sparse time at each mask relative to mask 0 (the ideal is the visible fraction)."""
    plan = results["plan"]
    rows = [r for r in _plain(measured(results)) if r["variant"] in ("sparse", "masked_dense")
            and r["batch"] == plan["batch"] and r["size"] == plan["size"]]
    out = []
    for (model, part, variant) in sorted({(r["model"], r["part"], _series(r)) for r in rows}):
        rs = {r["mask_ratio"]: r for r in rows if (r["model"], r["part"], _series(r)) == (model, part, variant)}
        if 0.0 not in rs:
            continue
        for m, r in sorted(rs.items()):
            out.append({"model": model, "part": part, "variant": variant, "mask_ratio": m,
                        "visible": r["visible_fraction"], "median_s": r["median_s"],
                        "relative_to_mask0": r["median_s"] / rs[0.0]["median_s"]})
    return out


PROFILE_FOLDERS = ("profile", "profile-encoder")
_PROFILED_PART = {"step": "a step's", "encoder_fwd_bwd": "the encoder's forward+backward", "encoder_fwd": "the encoder's forward"}


def profile_lines(profile: dict) -> list[str]:
    """The table of a results folder's ``profile*/profile.json`` (kernels_bench/profile.py)."""
    cases = profile["cases"]
    part = _PROFILED_PART.get(cases[0].get("part", "step"), "the profiled part's")
    lines = ["", f"Where {part} time goes (`python -m kernels_bench.profile`: torch.profiler over "
             f"{cases[0].get('steps', '?')} steps; wall time measured without the profiler; device time = the kernels' "
             "and copies' durations; GPU busy = device / wall, far below 1 when the host bounds the step; host ms in "
             "gather / tables = wall time inside `spark_me::to_sparse` / `spark_me::neighbour_tables`, MinkowskiEngine's "
             "coordinate maps and their synchronisations included; n/a where not recorded):", "",
             "| case | precision | ms/step | device ms | GPU busy | kernels | host syncs | host ms in gather / tables | "
             "most device time (or self CPU time) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in cases:
        if "error" in r:
            lines.append(f"| {r['name']} | {r.get('amp') or 'fp32'} | failed: {r['error'][:120]} | | | | | | |")
            continue
        device = r["device_s"] is not None
        top = ", ".join(f"`{t['name'][:60]}` {t['share']:.0%}" for t in (r["top_kernels"] or r["top_ops"])[:3])
        ranges = r.get("ranges")  # None in profiles from before the ranges; none at all for the dense variants
        host = ("n/a" if ranges is None or r.get("variant", "sparse") != "sparse" else
                " / ".join(_fmt(ranges.get(f"spark_me::{k}", 0.0) * 1e3, ".1f") for k in ("to_sparse", "neighbour_tables")))
        lines.append(
            f"| {r['name']} | {r.get('amp') or 'fp32'} | {r['wall_s'] * 1e3:.1f} | "
            f"{_fmt(r['device_s'] * 1e3 if device else None, '.1f')} | {_fmt(r['busy'], '.0%')} | "
            f"{r['kernels']:.0f} | {r['syncs']:.0f} | {host} | {top} |")
    return lines


def kernel_lines(kernels: list[dict]) -> list[str]:
    """The kernel-level tables (kernels_bench/kernels.py), one per layer shape. Rows from
    before the masked-dense column existed show n/a there."""
    shapes: dict[tuple, list[dict]] = defaultdict(list)
    for k in kernels:
        shapes[(k["batch"], k["channels"], k["map_size"], k.get("dense_layout", "contiguous"))].append(k)
    lines = []
    for (batch, channels, size, layout), rows in shapes.items():
        lines += ["", f"Kernel level (one layer: batch {batch}, C={channels}, {size}×{size} map; (b) and (c) in the "
                      f"same dtype, {layout.replace('_', ' ')}; kernel-map construction shown separately):", "",
                  "| layer | backend | dtype | pass | density | sites | sparse total s | coordinates + kernel map s | "
                  "(b) masked-dense s | (c) dense s | a/b | a/c |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {k['layer']} | {k.get('conv_impl', 'auto')} | {k.get('dtype', 'float32')} | {k['pass']} | "
                  f"{k['density_actual']:.2f} | {k['sites']} | {k['sparse_total_s']:.4f} | {k['kernel_map_direct_s']:.4f} | "
                  f"{_fmt(k.get('masked_dense_s'), '.4f')} | {k['dense_s']:.4f} | {_fmt(k.get('masked_ratio'), '.2f')} | "
                  f"{k['ratio']:.2f} |" for k in rows]
    return lines


def _kernel_section(payload: dict, folder: str) -> list[str]:
    """A results folder holding only per-layer rows (``python -m kernels_bench.kernels --out``)."""
    env, args, rows = payload["environment"], payload.get("args", {}), payload["kernels"]
    device = rows[0]["device"]
    command = " ".join(f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                       for k, v in args.items() if v not in (None, False) and k != "out")
    lines = [
        f"### {device.upper()}: {env.get('gpu') or env['cpu']} (`kernels_bench/results/{folder}`, per layer)",
        "",
        f"{env['date']}; torch {env['torch']}, MinkowskiEngine {env['minkowskiengine']}, Python {env['python']}, "
        f"{env['cpu_count']} cores, {rows[0]['threads']} torch thread(s), commit {env.get('git_commit')}. "
        f"`python -m kernels_bench.kernels {command}`." + (f" {payload['notes']}" if payload.get("notes") else ""),
    ]
    return lines + kernel_lines(rows) + [""]


def _device_section(results: dict, plots_rel: list[str], folder: str, profiles: Sequence[dict] = ()) -> list[str]:
    env, plan = results["environment"], results["plan"]
    memory = ("GPU: `torch.cuda.max_memory_allocated` during the timed runs, above what was allocated before"
              if plan["device"].startswith("cuda") else
              "CPU: growth of the process's peak RSS over the set-up, each case in a fresh process")
    lines = [
        f"### {plan['device'].upper()}: {env.get('gpu') or env['cpu']} (`kernels_bench/results/{folder}`)",
        "",
        f"{env['date']}; torch {env['torch']}, MinkowskiEngine {env['minkowskiengine']}, timm {env['timm']}, "
        f"Python {env['python']}, {env['cpu_count']} cores, {measured(results)[0]['threads']} torch thread(s), "
        f"commit {env.get('git_commit')}. Median of {plan['repeats']} timed runs after {plan['warmup']} warm-up. "
        f"Memory: {memory}." + (f" {results['notes']}" if results.get("notes") else "")
        + (" **Partial run**: it ended before its last case; these are the cases it finished." if results.get("partial") else ""),
        "",
        "Sanity before timing ((a) vs (b), same weights and mask, float32): " + "; ".join(
            _sanity_text(s) for s in results["sanity"]),
        "",
        "Each sparse row (one per conv backend and precision) is compared with (b) and (c) at the same "
        "precision, in their faster layout (the layout column).",
        "",
        "| model | part | batch | size | backend | precision | (a) img/s | (b) img/s | (b) layout | (c) img/s "
        "| (a) MiB | (b) MiB | (c) MiB | time a/b | mem a/b |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for h in headline(results):
        lines.append(
            f"| {h['model']} | {PART_LABELS[h['part']]} | {h['batch']} | {h['size']} | {h['backend']} | {h['setting']} | "
            f"{_fmt(h['a_img_s'], '.2f')} | {_fmt(h['b_img_s'], '.2f')} | {h['b_layout'] or 'n/a'} | {_fmt(h['c_img_s'], '.2f')} | "
            f"{_fmt(h['a_mib'], '.0f')} | {_fmt(h['b_mib'], '.0f')} | {_fmt(h['c_mib'], '.0f')} | "
            f"{_fmt(h['time_a_over_b'], '.2f')} | {_fmt(h['mem_a_over_b'], '.2f')} |")
    targets = gpu_targets(results) if plan["device"].startswith("cuda") else []
    if targets:
        lines += ["", "Issue #11's GPU targets (batch 128, 224 px, mask 0.6):", "",
                  "| model | backend | target | bound | measured | met |", "|---|---|---|---|---|---|"]
        lines += [f"| {t['model']} | {t['backend']} | {t['target']} | {t['bound']} | {_fmt(t['value'], '.2f')} | "
                  f"{'yes' if t['met'] else '**no**'} |" for t in targets]
    sc = scaling(results)
    if sc:
        lines += ["", "Time against mask ratio, relative to mask 0 (ideal: the visible fraction):", "",
                  "| model | part | variant | mask | visible | seconds | vs mask 0 |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {s['model']} | {PART_LABELS[s['part']]} | {s['variant']} | {s['mask_ratio']:.2f} | "
                  f"{s['visible']:.2f} | {s['median_s']:.3f} | {s['relative_to_mask0']:.2f} |" for s in sc]
    if results.get("kernels"):
        lines += kernel_lines(results["kernels"])
    if results.get("breakdown"):
        bd = results["breakdown"]
        lines += ["", f"Where the time of a sparse step goes ({bd['model']}, batch {bd['batch']}, {bd['size']} px, "
                      f"mask {bd['mask_ratio']}, forward+backward; see kernels_bench/breakdown.py for the method):", "",
                  "| component | seconds | share |", "|---|---|---|"]
        lines += [f"| {k} | {v:.3f} | {bd['shares'][k]:.0%} |" for k, v in bd["components_s"].items()]
        lines += [f"| (whole step measured in one piece) | {bd['timings_s']['step_fwd_bwd']:.3f} | |", "",
                  "Top operators by self CPU time (torch.profiler, one step):", "", "| op | calls | self s | share |",
                  "|---|---|---|---|"]
        lines += [f"| `{o['op']}` | {o['calls']} | {o['self_s']:.3f} | {o['share']:.0%} |" for o in bd["profile_top_ops"]]
    for profile in profiles:
        if profile.get("cases"):
            lines += profile_lines(profile)
    failed = [r for r in results["rows"] if "error" in r]
    if failed:
        lines += ["", "Cases without a result: " + "; ".join(
            f"{r['model']} {_series(r)} {r['part']} b{r['batch']} {r['size']}px"
            f"{' ' + r['amp'] if r.get('amp') else ''}: {r['error']}" for r in failed)]
    for p in plots_rel:
        lines += ["", f"![{Path(p).stem}]({p})"]
    return lines + [""]


def write_report(results_root: Path, out: Path) -> Path:
    """Render docs/benchmarks.md from every results.json under ``results_root`` (full runs)."""
    sections = []
    for path in sorted(results_root.glob("*/results.json")):
        results = json.loads(path.read_text())
        if results["plan"].get("quick"):
            continue
        extra = path.parent / "kernels.json"  # python -m kernels_bench.kernels --out (tools/gpu_check.py bench)
        if extra.exists():
            results["kernels"] = (results.get("kernels") or []) + json.loads(extra.read_text())["kernels"]
        plots = plot(results, path.parent / "plots")
        rel = [str(Path("..") / p.relative_to(out.parent.parent)) if out.parent.parent in p.parents else str(p) for p in plots]
        # the step's profile, then the encoder's (tools/gpu_check.py writes both)
        profiles = [json.loads(f.read_text()) for f in (path.parent / d / "profile.json" for d in PROFILE_FOLDERS)
                    if f.exists()]
        sections.append(_device_section(results, rel, path.parent.name, profiles))
    for path in sorted(results_root.glob("*/kernels.json")):
        if not (path.parent / "results.json").exists():  # else shown with that folder's results
            sections.append(_kernel_section(json.loads(path.read_text()), path.parent.name))
    devices = {json.loads(p.read_text())["plan"]["device"].split(":")[0] for p in results_root.glob("*/results.json")
               if not json.loads(p.read_text())["plan"].get("quick")}
    lines = [
        "# Benchmarks: true sparse against dense masking",
        "",
        "Generated by `python -m kernels_bench report` from `kernels_bench/results/*/results.json` "
        "(`python -m kernels_bench --device cpu|cuda` measures and regenerates it). "
        "(a) spark_me's sparse encoder (its conv backend per row: `torch`, `triton` or `minkowski`); (b) the masked-dense emulation of the official "
        "SparK code (dense convs on the zeroed image, re-masked, BN over visible sites; "
        "kernels_bench/emulation.py, tested equal to (a)); (c) the same network dense on the unmasked image. "
        "img/s = batch / median seconds; a/b < 1 means spark_me is faster or smaller.",
        "",
    ]
    if "cuda" not in devices:
        lines += ["**GPU rows are missing**: no CUDA machine has run the suite yet "
                  "(`python -m kernels_bench --device cuda` on one writes them).", ""]
    if ANALYSIS.exists():
        lines += [ANALYSIS.read_text().rstrip(), ""]
    lines += ["## Results", ""]
    for s in sections:
        lines += s
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    log.info("wrote %s", out)
    return out
