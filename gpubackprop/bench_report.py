"""Benchmark results as files: JSON, a markdown report, and a PNG of the scaling curves.

``gpubackprop.benchmark`` measures; this module only formats what it measured.
"""

import json
import os

TARGETS = {"L": 1.25, "S": 1.7, "T": 5.0}  # issue 4: fused float32 over PyTorch, CPU
GEMM_TARGET = ("L", 0.9)
OPS_TARGET = ((256, 1024), 2.0)
# issue 15, CPU, fused float32: network -> (× PyTorch, fraction of the step's GEMM limit or None)
NETWORK_TARGETS = {"lenet5": (1.5, 0.7), "vgg": (1.0, 0.7), "resnet": (1.3, 0.7), "lstm": (1.1, None),
                   "gru": (1.5, None), "transformer": (1.0, None)}  # transformer: issue 19
NETWORK_ORDER = ("lenet5", "vgg", "resnet", "lstm", "gru", "transformer")
SPLIT_NOTES = {
    "conv GEMM": "the conv layers' forward, weight- and input-gradient GEMMs",
    "conv other": "the conv layers' bias+activation, its derivative, the bias gradient, the weight "
                  "gradient's sum over a chunk and copies",
    "winograd transforms": "the Winograd conv layers' tile transforms (filter U = GgGᵀ and its "
                           "adjoint, input V = BᵀdB and dX, output Z = AᵀMA and dM), the "
                           "calling thread's half",
    "winograd GEMM": "the Winograd conv layers' 16 GEMMs a chunk (M = U·V, dU = dM·Vᵀ, "
                     "dV = Uᵀ·dM), the calling thread's half (the worker's runs at the same time)",
    "winograd chunks": "the Winograd conv layers' halves where the kernel set runs a half in one "
                       "call (the fused CPU set): the input and output transforms and the 16 "
                       "GEMMs a chunk together, the calling thread's half",
    "conv direct": "the direct convolutions (forward, and BP3 with dX in one pass)",
    "activation": "Activation layers (after a norm or a sum)",
    "pooling": "max, average and global average pooling",
    "recurrent other": "the recurrent layers' input bias, bias gradients and copies",
    "attention GEMM": "the attention's projection, score, value and out_proj GEMMs and their "
                      "gradients",
    "softmax": "the attention's masked softmax, forward and backward",
    "attention other": "the attention's bias adds, bias gradients, scaled query weights and masks",
    "dense": "the dense layers whole (GEMMs, bias, activation)",
    "rest": "loss, optimizer, reshapes and Python between the layers"}


def _fmt(x, spec=".0f", none="—"):
    return none if x is None else format(x, spec)


def markdown(results):
    """The whole report as a markdown string."""
    env = results["environment"]
    out = [f"# gpubackprop benchmarks: {env['machine_type']}", ""]
    out.append(f"{env['cpu']} ({env['cpu_count']} cores)"
               + (f", {env['gpu']}" if env.get("gpu") else "")
               + f"; Python {env['python']}, NumPy {env['numpy']} ({env['blas']}, "
               f"{env['blas_threads']} threads), Numba {env['numba']} ({env['numba_threads']} "
               f"threads), PyTorch {env['torch']}"
               + (f" ({env['torch_threads']} threads)" if "torch_threads" in env else "")
               + f", scikit-learn {env['sklearn']}; {env['date']}.")
    m = results["method"]
    out.append("")
    out.append(f"float32, softmax cross-entropy, SGD lr {m['lr']} momentum {m['momentum']}. "
               f"Interleaved: {m['rounds']} rounds of ~{m['block_s']} s blocks per contender in "
               f"rotating order, {m['quiesce_s']} s pause before each CPU block (other libraries' "
               f"thread pools stop spinning)"
               + (f", then {m['prime_calls']} untimed call{'s' * (m['prime_calls'] != 1)} (the "
                  f"contender's own threads and caches warm again: a block times steady steps)"
                  if m.get("prime_calls") else "")
               + f", device synchronised before each clock read; "
               f"throughputs are medians over rounds, ratios medians of per-round ratios."
               + (" **Quick mode: tiny sizes, numbers meaningless.**" if results.get("quick")
                  else ""))
    busy = m.get("busy_before_blocks")
    if busy and busy.get("blocks"):
        out.append("")
        out.append(f"Shared machine: before each CPU block the runner waits (up to a few seconds) "
                   f"until the CPUs are at most {busy['threshold']:.0%} busy; "
                   f"{busy['over_threshold']} of {busy['blocks']} blocks still started above that "
                   f"(median busy {busy['median']:.0%}, max {busy['max']:.0%}).")
    if "throughput" in results:
        out += ["", "## Training step throughput", ""]
        out += _throughput_table(results["throughput"], results["shapes"])
    for key in NETWORK_ORDER:
        if key in results:
            out += ["", f"## {results[key]['title']}", ""]
            out += _network_tables(key, results[key])
    if "gemm" in results:
        out += ["", "## GEMM rates of the step's shapes (xp.matmul, out=)", ""]
        out.append("| device | m×k×n | GFLOP/s | µs |")
        out.append("| --- | --- | ---: | ---: |")
        for r in results["gemm"]:
            out.append(f"| {r['device']} | {r['m']}×{r['k']}×{r['n']} | {r['gflops']:.1f} | "
                       f"{r['us']:.0f} |")
    if "ops" in results:
        out += ["", "## Elementwise ops: fused vs reference", ""]
        out += _ops_table(results["ops"])
    if "scaling" in results:
        out += ["", "## Scaling", ""]
        out += _scaling_table(results["scaling"])
    if "memory" in results:
        out += ["", "## Memory", ""]
        out.append("| device | shape | contender | allocated during one step | growth over N "
                   "steps | tool |")
        out.append("| --- | --- | --- | ---: | ---: | --- |")
        for r in results["memory"]:
            g = "—" if r["growth_bytes"] is None else f"{r['growth_bytes']} B ({r['growth_steps']})"
            out.append(f"| {r['device']} | {r['shape']} | {r['contender']} | "
                       f"{r['step_peak_bytes']} B | {g} | {r['tool']} |")
    targets = _targets(results)
    if len(targets) > 2:  # rows beyond the header: the targets are CPU ones, a GPU-only run has none
        out += ["", "## Targets (CPU, fused float32)", ""]
        out += targets
    if "seconds" in results:
        out += ["", f"Total benchmark time: {results['seconds']:.0f} s."]
    return "\n".join(out) + "\n"


def _throughput_table(rows, shapes):
    out = ["| device | shape | contender | samples/s | ms/step | GFLOP/s | × PyTorch | "
           "of GEMM limit |",
           "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        sh = shapes.get(r["shape"], {})
        label = f"{r['shape']} ({'-'.join(map(str, sh.get('sizes', [])))}, B={sh.get('batch')})"
        name = r["contender"] + (f" ({r['note']})" if r.get("note") and r["library"] in
                                 ("scikit-learn",) else "")
        if r.get("samples_per_s") is None:
            out.append(f"| {r['device']} | {label} | {name} | {r.get('note', '')} | | | | |")
            continue
        frac = r.get("gemm_fraction")
        frac_s = "" if r["contender"].startswith("GEMMs only") or frac is None else f"{frac:.2f}"
        out.append(f"| {r['device']} | {label} | {name} | {r['samples_per_s']:.0f} | "
                   f"{r['step_ms']:.3f} | {r['gflops']:.1f} | "
                   f"{_fmt(r.get('ratio_to_pytorch'), '.2f')} | {frac_s} |")
    out.append("")
    out.append("GEMM limit: the time of the step's GEMMs alone (forward, weight- and "
               "input-gradient GEMMs of every layer, 6·B·Σn_in·n_out FLOPs, back to back with "
               "out=) over the step's time, each library against its own GEMMs (NumPy/CuPy for "
               "gpubackprop, torch.mm for PyTorch), median of per-round ratios. A step skips the "
               "first layer's input gradient, so it can exceed 1.")
    return out


def _network_tables(key, r):
    shape = "x".join(map(str, r["input_shape"]))
    want_ratio, want_gemm = NETWORK_TARGETS.get(key, (None, None))
    out = [f"`--model {r.get('model', r['spec'])}` on {shape} inputs, batch {r['batch']}: "
           f"{r['summary']}.", "",
           f"{r['step_flops'] / 1e6:.1f} MFLOP of GEMMs a step"
           + (" (nominal: every convolution as the direct sum, im2col + GEMM, as PyTorch's FLOPs "
              "count it)" if any(g[0].startswith("conv") for g in r.get("gemms", [])) else "")
           + "".join(f"; the {k} set's step runs {v / 1e6:.1f} MFLOP of GEMMs"
                     for k, v in r.get("gemm_flops_run", {}).items() if v != r["step_flops"])
           + ". Targets (issue "
           f"{19 if key == 'transformer' else 15}) on the CPU, "
           f"fused: × PyTorch ≥ {want_ratio}"
           + (f", of GEMM limit ≥ {want_gemm}" if want_gemm else "") + ".", "",
           "| device | contender | samples/s | ms/step | GFLOP/s | × PyTorch (target) | "
           "of GEMM limit (target) | of peak sgemm |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in r["rows"]:
        if row.get("samples_per_s") is None:
            out.append(f"| {row['device']} | {row['contender']} | {row.get('note', '')} | | | | | |")
            continue
        gemm_only = row["contender"].startswith("GEMMs only")
        frac = row.get("gemm_fraction")
        ratio = _fmt(row.get("ratio_to_pytorch"), ".2f")
        frac_s = "" if gemm_only or frac is None else f"{frac:.2f}"
        if row["device"] == "cpu" and row["contender"] == "gpubackprop fused":
            ratio = f"**{ratio}** (≥ {want_ratio})" if want_ratio else ratio
            frac_s += f" (≥ {want_gemm})" if want_gemm and frac_s else ""
        out.append(f"| {row['device']} | {row['contender']} | {row['samples_per_s']:.0f} | "
                   f"{row['step_ms']:.2f} | {row['gflops']:.1f} | {ratio} | {frac_s} | "
                   f"{row['peak_fraction']:.2f} |")
    peaks = ", ".join(f"{p['device']} {p['gflops']:.0f} GFLOP/s ({p['n']}³ sgemm)"
                      for p in r.get("peak", []))
    out += ["", "Of GEMM limit: t(the GEMMs the contender's own step runs, alone, back to back, "
            "in the layers' layouts and threads) / t(step), median of per-round ratios. \"GEMMs "
            "only\" is the fused set's GEMMs as they run: a Winograd conv layer's 16 GEMMs "
            "(C_out×C_in)·(C_in×tiles) a chunk (forward, dU, dV) in its two halves of chunks on "
            "two threads, none for a direct convolution, im2col GEMMs on one BLAS thread for the "
            "others; the "
            "recurrent GEMMs in the fused ops' row chunks, one thread and one BLAS thread each. "
            "\"GEMMs only (reference)\" (where it differs) the reference set's (im2col, one "
            "GEMM a step); PyTorch's the nominal GEMMs by torch.matmul. GFLOP/s and of peak "
            "sgemm count the nominal FLOPs for every contender (the direct convolution's, as "
            "PyTorch's; Winograd does 2.25× fewer multiplications in its GEMMs): nominal FLOPs / "
            f"peak rate / t(step); peak: {peaks}."]
    if r.get("split"):
        cats = []
        for sp in r["split"]:
            cats += [c for c in sp["ms"] if c not in cats and c != "rest"]
        from gpubackprop.benchmark.split import SPLIT_CATEGORIES

        order = {c: i for i, c in enumerate(SPLIT_CATEGORIES)}  # the split's order, any set's
        cats.sort(key=lambda c: order.get(c, len(order)))
        out += ["", "Where a step's time goes (ms a step, share of the instrumented step), from an "
                "instrumented run that clocks every layer's passes and the conv and recurrent "
                "layers' kernel calls:", "",
                "| device | contender | step ms | instrumented ms | " + " | ".join(cats)
                + " | rest |",
                "| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in cats) + " | ---: |"]
        for sp in r["split"]:
            cells = [f"{sp['ms'][c]:.2f} ({sp['fraction'][c]:.0%})" if c in sp["ms"] else ""
                     for c in [*cats, "rest"]]
            out.append(f"| {sp['device']} | {sp['contender']} | {sp['step_ms']:.2f} | "
                       f"{sp.get('instrumented_ms', sp['step_ms']):.2f} | " + " | ".join(cells)
                       + " |")
        notes = [f"{c}: {SPLIT_NOTES[c]}" for c in [*cats, "rest"] if c in SPLIT_NOTES]
        out += ["", "; ".join(notes) + "."]
    return out


def _ops_table(rows):
    out = ["| device | op | size | reference GB/s | fused GB/s | fused/reference | "
           "fused/copy | bytes |",
           "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    by = {}
    for r in rows:
        by[(r["device"], r["op"], tuple(r["shape"]), r["kernels"])] = r
    for (dev, op, shape, kernels), r in by.items():
        if op == "copy":
            out.append(f"| {dev} | copy | {shape[0]}×{shape[1]} | {r['gbs']:.1f} | | | | "
                       f"{r['bytes']} |")
        elif kernels == "fused":
            ref = by[(dev, op, shape, "reference")]
            out.append(f"| {dev} | {op} | {shape[0]}×{shape[1]} | {ref['gbs']:.1f} | "
                       f"{r['gbs']:.1f} | {r['fused_over_reference']:.2f} | "
                       f"{r['fraction_of_copy']:.2f} | {r['bytes']} |")
    out.append("")
    out.append("Bytes: minimal bytes read + written, float32 (int64 labels): act_backward 3·n "
               "(relu), bias_act 2·n + cols (relu, in place), softmax_ce 2·n + rows (+ labels), "
               "sgd 5·n (momentum), bias_grad n + cols, copy 2·n.")
    return out


def _scaling_table(rows):
    out = ["| device | axis | value | sizes | batch | reference/s | fused/s | PyTorch/s | "
           "fused × PyTorch |",
           "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    points = {}
    for r in rows:
        points.setdefault((r["device"], r["axis"], r["value"]), {})[r["contender"]] = r
    for (dev, axis, value), cs in points.items():
        any_r = next(iter(cs.values()))
        ref, fused, pt = (cs.get("gpubackprop reference"), cs.get("gpubackprop fused"),
                          cs.get("pytorch"))
        out.append(f"| {dev} | {axis} | {value} | {'-'.join(map(str, any_r['sizes']))} | "
                   f"{any_r['batch']} | {_fmt(ref and ref['samples_per_s'])} | "
                   f"{_fmt(fused and fused['samples_per_s'])} | "
                   f"{_fmt(pt and pt['samples_per_s'])} | "
                   f"{_fmt(fused and fused['ratio_to_pytorch'], '.2f')} |")
    return out


def target_checks(results):
    """[(what, measured, target, met)] for the CPU targets of issues 4 (MLPs, ops) and 15 (networks)."""
    checks = []
    for r in results.get("throughput", []):
        if r["device"] != "cpu" or r["contender"] != "gpubackprop fused":
            continue
        if r["shape"] in TARGETS and r.get("ratio_to_pytorch") is not None:
            t = TARGETS[r["shape"]]
            checks.append((f"{r['shape']}: fused × PyTorch", r["ratio_to_pytorch"], t,
                           r["ratio_to_pytorch"] >= t))
        if r["shape"] == GEMM_TARGET[0] and r.get("gemm_fraction") is not None:
            checks.append((f"{r['shape']}: fraction of the GEMM limit", r["gemm_fraction"],
                           GEMM_TARGET[1], r["gemm_fraction"] >= GEMM_TARGET[1]))
    for key in NETWORK_ORDER:
        want_ratio, want_gemm = NETWORK_TARGETS[key]
        for r in results.get(key, {}).get("rows", []):
            if r["device"] != "cpu" or r["contender"] != "gpubackprop fused":
                continue
            title = results[key]["title"]
            if r.get("ratio_to_pytorch") is not None:
                checks.append((f"{title}: fused × PyTorch", r["ratio_to_pytorch"], want_ratio,
                               r["ratio_to_pytorch"] >= want_ratio))
            if want_gemm is not None and r.get("gemm_fraction") is not None:
                checks.append((f"{title}: fraction of the GEMM limit", r["gemm_fraction"],
                               want_gemm, r["gemm_fraction"] >= want_gemm))
    shape, t = OPS_TARGET
    for r in results.get("ops", []):
        if r["device"] == "cpu" and r["kernels"] == "fused" and tuple(r["shape"]) == shape:
            checks.append((f"{r['op']} {shape[0]}×{shape[1]}: fused × reference",
                           r["fused_over_reference"], t, r["fused_over_reference"] >= t))
    return checks


def _targets(results):
    out = ["| target | measured | wanted | met |", "| --- | ---: | ---: | --- |"]
    for what, measured, target, met in target_checks(results):
        out.append(f"| {what} | {measured:.2f} | ≥ {target} | {'yes' if met else '**no**'} |")
    return out


def plot(results, path):
    """PNG of the scaling curves (samples/s against batch size and against width)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results.get("scaling", [])
    devices = sorted({r["device"] for r in rows})
    fig, axes = plt.subplots(len(devices) or 1, 2, figsize=(11, 4 * max(1, len(devices))),
                             squeeze=False)
    for i, dev in enumerate(devices):
        for j, axis in enumerate(("batch", "width")):
            ax = axes[i][j]
            pts = [r for r in rows if r["device"] == dev and r["axis"] == axis]
            for name in sorted({r["contender"] for r in pts}):
                xs = [r["value"] for r in pts if r["contender"] == name]
                ys = [r["samples_per_s"] for r in pts if r["contender"] == name]
                ax.plot(xs, ys, marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            sizes = pts[0]["sizes"] if pts else []
            ax.set_xlabel("batch size" if axis == "batch" else "hidden width w")
            ax.set_ylabel("samples/s (training step)")
            ax.set_title(f"{dev}: " + (f"{'-'.join(map(str, sizes))}, batch 1..1024"
                                       if axis == "batch" else
                                       f"{sizes[0] if sizes else ''}-w-w-"
                                       f"{sizes[-1] if sizes else ''}, batch "
                                       f"{pts[0]['batch'] if pts else ''}"))
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
    fig.suptitle(f"gpubackprop scaling, float32, SGD momentum: "
                 f"{results['environment']['machine_type']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write(results, out_dir, name=None, plot_png=True):
    """Write <name>.json, .md and (with scaling results) .png into ``out_dir``; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, name or results["environment"]["machine_type"])
    paths = []
    data = {k: v for k, v in results.items() if k != "markdown"}
    tmp = stem + ".json.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=_jsonable)
    os.replace(tmp, stem + ".json")
    paths.append(stem + ".json")
    with open(stem + ".md", "w") as f:
        f.write(results.get("markdown") or markdown(results))
    paths.append(stem + ".md")
    if plot_png and results.get("scaling"):
        paths.append(plot(results, stem + ".png"))
    return paths


def _jsonable(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)
