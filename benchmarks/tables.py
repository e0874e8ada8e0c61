"""Every table of measured numbers in the docs, rendered from the JSON under ``benchmarks/results/``.

    python benchmarks/tables.py            # rewrite the tables in README.md and docs/*.md
    python benchmarks/tables.py --check    # exit 1, naming each table that differs from its JSON

In a doc, a table sits between two markers, each alone on its line:

    <!-- table: NAME -->
    | ... |
    <!-- end table -->

NAME is a key of :data:`TABLES`, which maps it to the function rendering it from its JSON file(s).
Nothing else in a doc is touched. ``tests/test_docs_tables.py`` runs the check in the test suite, so
a number in a table cannot drift from its measurement: change the JSON (re-run the benchmark), then
run this script.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
MARKED = re.compile(r"^<!-- table: (?P<name>[\w-]+) -->\n(?P<body>.*?)^<!-- end table -->$", re.M | re.S)
OPENING = re.compile(r"^<!-- table: (?P<name>[^ ]*) -->$", re.M)


@cache
def result(name: str) -> dict:
    """``benchmarks/results/NAME.json``."""
    return json.loads((RESULTS / f"{name}.json").read_text())


def num(value: float, digits: int = 0) -> str:
    """``value`` with thousands separators and ``digits`` decimals; a minus sign as the typographic one."""
    return f"{value:,.{digits}f}".replace("-", "−")


def signed(value: float, digits: int = 1, unit: str = "") -> str:
    return f"{value:+,.{digits}f}{unit}".replace("-", "−")


def sci(value: float) -> str:
    """A small KL: ``8.3e-5``, ``0`` for zero."""
    if value == 0:
        return "0"
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def times(ratio: float, digits: int = 2) -> str:
    return f"{ratio:.{digits}f}×"


def markdown(header: list[str], rows: list[list[str]], right: set[int] | None = None) -> str:
    """A markdown table; the columns in ``right`` (default: all but the first) right-aligned."""
    right = set(range(1, len(header))) if right is None else right
    rule = ["---:" if i in right else "---" for i in range(len(header))]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, rule, *rows]) + "\n"


# --- quality: which targets, which k ------------------------------------------------------------------


def k_sweep() -> str:
    """Every student of the sweep by its cache's bytes/token (rows of the previous sweep marked in their label),
    then the references; mean ± sd over the seeds a row has (the mean alone for one seed)."""
    sweep = result("k_sweep_cpu")

    def spread(variant: dict, metric: str, digits: int = 3, sign: bool = False, pct: bool = False) -> str:
        agg = variant["aggregate"].get(metric)
        if agg is None:
            return "—"
        mean = signed(agg["mean"], 1 if pct else digits) if sign else f"{agg['mean']:.{digits}f}"
        mean += "%" if pct else ""
        if len(agg["values"]) == 1:
            return mean
        return f"{mean} ± {agg['sd']:.1f}%" if pct else f"{mean} ± {agg['sd']:.{digits}f}"

    references = ("online", "hard-labels")
    def is_reference(key: str) -> bool:
        return key.removeprefix("previous-") in references

    cached = sorted((k for k in sweep["variants"] if not is_reference(k)),
                    key=lambda k: sweep["variants"][k]["cache"]["bytes_per_token"])
    rows = []
    for key in cached + [k for k in sweep["variants"] if is_reference(k)]:
        variant = sweep["variants"][key]
        online = key.removeprefix("previous-") == "online"
        size = variant["bytes_note"] if is_reference(key) else num(variant["cache"]["bytes_per_token"], 1)
        reaches = {True: "yes", False: "no"}[variant["aggregate"]["reaches_online"]]
        rows.append([variant["label"], str(size), str(len(variant["aggregate"]["ce"]["values"])), spread(variant, "ce"),
                     "—" if online else spread(variant, "ce_gap_to_online_pct", sign=True, pct=True),
                     spread(variant, "kl_full"), "—" if online else spread(variant, "kl_full_gap_to_online", sign=True),
                     "—" if online else reaches, spread(variant, "top1_agreement")])
    rows.append(["teacher", "", "", f"{sweep['teacher']['ce']:.3f}", "", "0", "", "", "1"])
    return markdown(["student", "bytes/token (T = 1)", "seeds", "held-out CE", "CE gap to online KD",
                     "full-vocabulary KL", "full-KL gap to online KD", "reaches online KD", "top-1 agreement"], rows)


def kd_targets() -> str:
    report = result("kd_targets_cpu")
    rows = []
    for variant in report["variants"].values():
        size = variant["bytes_note"] if variant["cache"] is None else num(variant["cache"]["bytes_per_token"], 1)
        agg = {name: values["mean"] for name, values in variant["aggregate"].items()}
        gap = "0" if variant["label"].startswith("online") else signed(agg["ce_gap_to_online"], 3)
        rows.append([variant["label"], variant["settings"], str(size), f"{agg['ce']:.3f}", f"{agg['kl_full']:.3f}",
                     f"{agg['top1_agreement']:.3f}", gap])
    rows.append(["teacher", "", "", f"{report['teacher']['ce']:.3f}", "0", "1", ""])
    return markdown(["targets", "settings", "B/token", "held-out CE", "full KL to teacher", "top-1 agreement",
                     "CE gap to online KD"], rows, right={2, 3, 4, 5, 6})


def cache_size() -> str:
    measured = result("cache_size_cpu")["results"][0]
    rows = [[f"`{values}`", f"{got['bytes_per_entry']:.2f}", num(got["bytes_per_token"]), sci(got["kl_T1"]),
             sci(got["kl_T2"])] for values, got in measured["implemented"].items()]
    today, fp16 = measured["summary"], measured["values"]["fp16 (z - max), today"]
    rows.append(["format 1 (uint16 ids, fp16 values)", f"{today['bytes_per_entry_today']:.2f}",
                 num(today["bytes_per_token_today"]), sci(fp16["kl_T1"]), sci(fp16["kl_T2"])])
    return markdown(["`--values`", "B/entry", "B/token (k = 64, T = 1, 2, 4)", "KL at T = 1 (nats/token)",
                     "KL at T = 2"], rows)


def cache_size_large_vocab() -> str:
    report = result("cache_size_cpu")
    large = report["results"][1]
    rows = [["quantized (format 2)", str(large["id_floors"]["ceil_log2_V"]),
             f"{report['v152k_ids_with_demo_values']['implemented']['bytes_per_entry_all_included']:.2f}"],
            ["format 1 (uint32 ids, fp16 values)", "32", f"{large['summary']['bytes_per_entry_today']:.2f}"]]
    return markdown([f"V = {num(large['vocab'])}, k = 64, T = 1, 2, 4", "bits per id", "B/entry, all included"], rows)


def demo_capture_sizes() -> str:
    captures = result("cache_size_cpu")["demo_captures"]
    rows = [[name, num(got["bytes_per_token"])] for name, got in captures.items()]
    return markdown(["demo cache (T = 1, 2)", "B/token"], rows)


def tail_mass() -> str:
    by_k = result("cache_views_cpu")["tail_mass_by_k"]
    temperatures = list(next(iter(by_k.values()))["mean_tail_mass"])
    rows = [[k, num(got["bytes_per_token"]), *(f"{got['mean_tail_mass'][t]:.3f}" for t in temperatures)]
            for k, got in by_k.items()]
    return markdown(["k", "bytes/token", *(f"tail mass T = {t}" for t in temperatures)], rows)


def fidelity() -> str:
    rows = []
    for label, got in result("cache_views_cpu")["fidelity"].items():
        report = got["inspect"]["fidelity"]
        at = report["by_temperature"]
        rows.append([label, num(report["bytes_per_token"]), sci(at["1"]["kl_bins"]), f"{at['1']['mass_covered']:.3f}",
                     f"{at['1']['grad_cosine']:.4f}", f"{at['2']['grad_cosine']:.3f}"])
    return markdown(["cache", "B/token", "KL T = 1", "mass covered T = 1", "gradient cosine T = 1", "T = 2"], rows)


def demo_variant() -> str:
    """The k-sweep row that is the demo's cached student: named from the demo's own capture settings."""
    from kdpipe.pipeline.demo import TASKS

    spec = TASKS["causal-lm"]
    if spec.sample:
        return f"mixed-{spec.top_k}+{spec.sample}" if spec.top_k else f"sampled-{spec.sample}"
    return f"top-{spec.top_k}"


def demo() -> str:
    """The demo's three students (its settings and seed 0 are the k sweep's): seed 0, and over three seeds."""
    sweep = result("k_sweep_cpu")
    cached = sweep["variants"][demo_variant()]
    def row(name: str) -> str:  # a reference may come from the previous sweep (same settings)
        return name if name in sweep["variants"] else f"previous-{name}"

    targets = cached["label"].removeprefix("mixed (").removesuffix(")").replace("tail draws", "draws")
    labels = {demo_variant(): f"kd student ({targets})", row("hard-labels"): "hard-label student",
              row("online"): "online KD student"}
    rows = [["teacher", f"{sweep['teacher']['ce']:.4f}", "", "0", "", "1"]]
    for key, label in labels.items():
        variant = sweep["variants"][key]
        seed0, agg = variant["runs"].get("0", {}).get("heldout"), variant["aggregate"]
        at0 = (lambda key: "—" if seed0 is None else f"{seed0[key]:.4f}")
        over = (lambda key: f"{agg[key]['mean']:.3f} ± {agg[key]['sd']:.3f} ({len(agg[key]['values'])})")
        rows.append([label, at0("ce"), over("ce"), at0("kl_full"), over("kl_full"), at0("top1_agreement")])
    return markdown(["model", "held-out CE, seed 0", "CE over seeds (how many)", "full-vocabulary KL, seed 0",
                     "KL over seeds", "top-1 agreement, seed 0"], rows)


def chat_example_caches() -> str:
    rows = []
    for name, got in result("chat_example_cpu")["caches"].items():
        cache = got["inspect"]
        rows.append([f"`runs/{name}`", num(cache["rows"]), num(got["manifest_totals"]["truncated_rows"]),
                     num(cache["tokens"]), f"{cache['bytes'] / 2**20:.2f} MiB", num(cache["bytes_per_token"])])
    return markdown(["cache (top-64, seq-len 256)", "conversations", "truncated", "target (assistant) tokens", "size",
                     "bytes per target token"], rows)


def chat_example() -> str:
    rows = [[model, f"{got['ce']:.3f}", f"{got['kl_topk_bins']:.3f}", f"{got['top1_agreement']:.3f}"]
            for model, got in result("chat_example_cpu")["heldout"].items()]
    return markdown(["model", "CE", "`kl_topk_bins` ((k+1)-bin view: a lower bound of the full KL)", "top-1 agreement"],
                    rows)


# --- the classification demo ---------------------------------------------------------------------------

STUDENT_PARAMETERS = {"cnn_student": "6,274", "cnn_student_small": "1,702"}  # data/mnist_models.py


def pct(value: float, sd: float | None = None, digits: int = 2) -> str:
    """A fraction as a percentage, with its sd when given: ``91.38 ± 1.09 %``."""
    return f"{100 * value:.{digits}f}" + ("" if sd is None else f" ± {100 * sd:.{digits}f}") + " %"


def points(value: float, sd: float | None = None, digits: int = 2) -> str:
    """An accuracy difference in percentage points: ``+3.10 ± 1.02``."""
    return signed(100 * value, digits) + ("" if sd is None else f" ± {100 * sd:.{digits}f}")


def _classification_run() -> dict:
    """``kdpipe demo --task classification``'s results.json, from the OMP_NUM_THREADS=1 run."""
    return result("classification_demo_threads_cpu")["demo_runs"]["1"]["results"]


def classification_demo() -> str:
    """Teacher and both students on the 1,000 held-out digits: mean ± sd over the demo's seeds."""
    run = _classification_run()
    rows = []
    for model, got in run["table"].items():
        def spread(metric: str, as_pct: bool = False, digits: int = 3) -> str:
            sd = got.get(f"{metric}_sd")
            if as_pct:
                return pct(got[metric], sd)
            return f"{got[metric]:.{digits}f}" + ("" if sd is None else f" ± {sd:.{digits}f}")

        rows.append([model, spread("accuracy", as_pct=True), spread("macro_f1"), spread("ece"),
                     "0" if model == "teacher" else spread("kl_full"), spread("top1_agreement")])
    seeds = len(run["seeds"])
    return markdown(["model", f"accuracy ({seeds} seeds)", "macro-F1", "ECE", "KL to the teacher", "top-1 agreement"],
                    rows)


def classification_demo_seeds() -> str:
    """Each seed's two students and the paired gain (KD minus hard-label accuracy on the same seed)."""
    run = _classification_run()
    gain = run["accuracy_gain"]
    rows = [[str(seed), pct(kd, digits=1), pct(hard, digits=1), points(g, digits=1)]
            for seed, kd, hard, g in zip(run["seeds"], gain["kd"]["per_seed"], gain["hard"]["per_seed"],
                                         gain["per_seed"])]
    rows.append(["mean ± sd", pct(gain["kd"]["mean"], gain["kd"]["sd"]), pct(gain["hard"]["mean"], gain["hard"]["sd"]),
                 points(gain["mean"], gain["sd"])])
    return markdown(["seed", "KD student accuracy", "hard-label student accuracy", "gain (points)"], rows)


def classification_demo_threads() -> str:
    """The demo run with OMP_NUM_THREADS=2 and =1: its quality numbers, and whether they are identical."""
    report = result("classification_demo_threads_cpu")
    same = "identical" if report["quality_numbers_identical"] else "differ"
    rows = []
    for threads, demo_run in report["demo_runs"].items():
        got = demo_run["results"]
        kd, hard = got["table"]["kd student"], got["table"]["hard-label student"]
        rows.append([f"`OMP_NUM_THREADS={threads}`", pct(kd["accuracy"]), pct(hard["accuracy"]),
                     points(got["accuracy_gain"]["mean"]), f"{got['wall_s']:.0f} s", same])
    return markdown(["run", "KD student accuracy (mean)", "hard-label (mean)", "gain (points)", "demo wall time",
                     "every quality number"], rows)


def classification_demo_sweep() -> str:
    """The settings the sweep tried (3 seeds each), the chosen one first, then the others by what they vary
    (in each group, in the order of the JSON: best gain / sd first)."""
    names = {"rows": "training digits", "grid": "T × α", "size": "student width × digits", "steps": "steps"}
    chosen = result("classification_demo_rows_cpu")["best"]
    key = ("rows", "student", "T", "alpha", "steps")
    seen, rows = set(), []

    def row(label: str, setting: dict) -> list[str]:
        gain = setting["accuracy_gain"]
        return [label, num(setting["rows"]), f"`{setting['student']}` ({STUDENT_PARAMETERS[setting['student']]})",
                f"{setting['T']:g}", f"{setting['alpha']:g}", str(setting["steps"]),
                pct(setting["kd_accuracy"]["mean"], setting["kd_accuracy"]["sd"], 1),
                pct(setting["hard_accuracy"]["mean"], setting["hard_accuracy"]["sd"], 1),
                points(gain["mean"], gain["sd"]), num(setting["score"], 1),
                "yes" if setting["gain_exceeds_spread"] else "no"]

    rows.append(row("**chosen**", chosen))
    seen.add(tuple(chosen[k] for k in key))
    for name, label in names.items():
        for setting in result(f"classification_demo_{name}_cpu")["settings"]:
            if tuple(setting[k] for k in key) not in seen:
                seen.add(tuple(setting[k] for k in key))
                rows.append(row(label, setting))
    return markdown(["varied", "digits", "student (parameters)", "T", "α", "steps", "KD accuracy", "hard-label",
                     "gain (points)", "gain / sd", "gain > spread"], rows, right={1, 3, 4, 5, 6, 7, 8, 9})


# --- reliability --------------------------------------------------------------------------------------


def kill_soak_train() -> str:
    soak = result("kill_soak_train_cpu")
    phases, leaving = soak["by_phase"], soak["kills_leaving"]
    rows = [[str(soak["kills"]), str(phases["start-up"]), str(phases["steps"]), str(phases["mid-write"]),
             str(leaving["tmp"]), str(leaving["previous_only"]), str(leaving["torn_metrics"]),
             f"{soak['identical']}/{soak['cycles']}", soak["damaged_folders_as_expected"]]]
    return markdown(["SIGKILLs", "in start-up", "during steps", "inside a checkpoint write",
                     "left a half-written `checkpoint.tmp/`", "left `checkpoint.previous/` only",
                     "left a torn metrics line", "resumed runs byte-identical", "damaged folders as expected"], rows,
                    right=set(range(9)))


def _soak_outcome(case: dict) -> str:
    """What a damaged-folder case printed, the run folder's path as ``RUN``, cut at its first ``;``."""
    if case.get("error_lines"):
        line = case["error_lines"][0]
    elif case.get("stdout"):
        line = case["stdout"]
    else:
        same = not case.get("differences_from_uninterrupted")
        return "resumed; " + ("byte-identical to the uninterrupted run" if same else "differs from the uninterrupted run")
    line = re.sub(r"/\S*/kdpipe-kill-soak-train-[^/\s]+/[^/\s]+", "RUN", line)
    return f"`{line.split(';')[0]}`"


def kill_soak_train_damaged() -> str:
    rows = []
    for damage, case in result("kill_soak_train_cpu")["damaged_folders"].items():
        unchanged = case.get("folder_unchanged")
        rows.append([damage, str(case["exit"]), _soak_outcome(case),
                     "—" if unchanged is None else ("yes" if unchanged else "no")])
    return markdown(["damage (then `--resume`)", "exit", "what it printed (up to its first `;`)", "folder unchanged"],
                    rows, right={1})


def reader_verify() -> str:
    report = result("reader_verify_cpu")
    every, one = report["evaluate_every_row"], report["inspect_one_row_per_shard"]
    shards = int(report["command"].split("--shards ")[1].split()[0])
    rows = [[f"`evaluate` / training: every row of {shards} shards", f"{every['unverified_s']:.1f} s",
             f"{every['verified_s']:.1f} s", f"+{100 * (every['ratio_median_of_pairs'] - 1):.0f} %"],
            [f"`inspect`: one row of each of {shards} shards", f"{one['unverified_s']:.2f} s",
             f"{one['verified_s']:.2f} s", f"+{one['overhead_s_per_shard']:.2f} s a shard"],
            ["`inspect` on a cache of 64 shards (extrapolated)", "", "",
             f"+{report['inspect_64_shards_extra_s']:.0f} s"]]
    shard = report["shard"]
    return markdown([f"read ({shard['file_mb']:.0f} MB shards: {shard['shape']})", "hash not checked",
                     "hash checked (default)", "cost of the check"], rows)


# --- performance --------------------------------------------------------------------------------------


def capture_throughput() -> str:
    rows = []
    for name in ("capture_h100", "capture_cpu"):
        run = result(name)
        speed, ratio = run["tokens_per_s"], run["ratio_to_forward"]
        rows.append([run["device"], run["teacher"], num(run["vocab"]), num(run["batch_tokens"]), str(run["top_k"]),
                     ", ".join(f"{t:g}" for t in run["temperatures"]), num(speed["forward"]),
                     f"{num(speed['sparse_view'])} ({times(ratio['sparse_view'])})",
                     f"{num(speed['capture'])} ({times(ratio['capture'])})", num(run["bytes_per_token"])])
    return markdown(["device", "teacher", "V", "tokens a batch", "k", "T", "forward tokens/s",
                     "+ sparse view (older)", "full capture", "B/token"], rows, right={2, 3, 4, 6, 7, 8, 9})


def capture_fused() -> str:
    names = {"capture_fused_demo_cpu": "demo teacher, 2 threads",
             "capture_fused_demo_1thread_cpu": "demo teacher, 1 thread",
             "capture_fused_v152k_cpu": "V = 151,936 head on a tiny body, 2 threads",
             "capture_fused_v152k_1thread_cpu": "V = 151,936 head on a tiny body, 1 thread"}
    rows = []
    for name, label in names.items():
        run = result(name)
        ratio = run["ratio_to_forward"]
        rows.append([f"{label} (`{name}.json`)", num(run["tokens_per_s"]["forward"]), times(ratio["view_reference"]),
                     times(ratio["view"]), times(ratio["fused_head"]), times(ratio["capture"])])
    return markdown(["run", "forward tokens/s", "previous view", "current view", "head-fused view", "full capture"],
                    rows)


def train_step() -> str:
    rows = []
    for name in ("train_h100", "train_cpu"):
        run = result(name)
        step, ratio = run["step_ms"], run["ratio_to_hard_label_ce"]
        rows.append([run["device"], f"{run['student_params'] / 1e6:.2f} M", run["batch"].replace("x", " × "),
                     num(run["vocab"]), str(run["top_k"]), num(step["hard_label_ce"]),
                     f"{num(step['cached_topk_kd'])} ({times(ratio['cached_topk_kd'])})",
                     f"{num(step['online_kd'])} ({times(ratio['online_kd'])})", num(run["loader_rows_per_s"]),
                     num(run["step_consumes_rows_per_s"]), times(run["loader_headroom"], 1)])
    return markdown(["device", "student", "rows × tokens", "V", "k", "hard-label CE ms/step", "cached top-k KD ms",
                     "online KD ms", "loader rows/s", "step consumes rows/s", "loader headroom"], rows,
                    right=set(range(3, 11)))


def loader_decode() -> str:
    run = result("loader_decode_cpu")
    rows = [[encoding, num(got["bytes_per_token"]), num(got["rows_per_s_median"]), times(got["vs_float16_values"])]
            for encoding, got in run["demo_loader"].items()]
    return markdown(["demo cache (V = 2,048)", "B/token", "loader rows/s", "vs float16 values"], rows)


def loader_decode_llm() -> str:
    run = result("loader_decode_cpu")["llm_scale_decode_one_process"]
    rows = [[values, f"{got['ms_per_row']:.1f}", num(got["rows_per_s"])] for values, got in run.items()]
    return markdown(["values (V = 151,936, seq-len 1,024, k = 64)", "ms per row", "rows/s, one process"], rows)


def train_memory() -> str:
    run = result("train_memory_cpu")
    median = run["median"]
    labels = {"unfused_ce": "hard labels, unfused (α = 0)", "unfused_kd": "top-64 KD, unfused (α = 0.5)",
              "fused_ce": "hard labels, fused", "fused_kd": "top-64 KD, fused",
              "fused_sampled": "sampled KD (64 draws), fused", "fused_mixed": "mixed KD (top-32 + 32 draws), fused"}
    base = {"unfused_kd": "unfused_ce", "fused_kd": "fused_ce", "fused_sampled": "fused_ce", "fused_mixed": "fused_ce"}
    rows = []
    for key, label in labels.items():
        if key not in median:
            continue
        got, ref = median[key], median.get(base.get(key, ""))
        step, rss = f"{got['s_per_step']:.2f}", f"{num(got['peak_rss_mb'])} MB"
        cpu = f"{got['cpu_s']:.1f}" if "cpu_s" in got else "—"
        if ref:
            step += f" ({times(got['s_per_step'] / ref['s_per_step'])})"
            rss += f" ({times(got['peak_rss_mb'] / ref['peak_rss_mb'])})"
            if "cpu_s" in got:
                cpu += f" ({times(got['cpu_s'] / ref['cpu_s'])})"
        rows.append([label, step, rss, cpu])
    return markdown(["step (× the same path's hard-label step)", "s/step", "peak RSS", "CPU s, whole run"], rows)


def fused_kd() -> str:
    summary = result("fused_kd_cpu")["summary"]
    labels = {"hard_ce": "hard-label CE, unfused", "unfused_kd": "cached KD, unfused",
              "fused_ce": "hard-label CE, fused", "fused_kd": "cached KD, fused"}
    rows = [[label, f"{summary[key]['step_s']:.2f}", times(summary[key]["time_vs_hard_ce"]),
             f"{summary[key]['peak_rss_gb']:.2f} GB", times(summary[key]["peak_rss_vs_hard_ce"])]
            for key, label in labels.items()]
    return markdown(["step (in one process)", "s/step", "vs unfused CE", "peak RSS", "vs unfused CE"], rows)


def ingest_data_path() -> str:
    run = result("ingest_cpu")
    rows = [[workers, num(got["tokens_per_s"]), f"{got['first_block_s']:.1f} s", f"{got['cpu_s']:.1f}"]
            for workers, got in run["data_path"]["by_workers"].items()]
    forward = run["teacher_forward"]
    rows.append([f"(the tiny teacher's forward, {forward['batch']})", num(forward["tokens_per_s"]), "", ""])
    return markdown(["`--num-workers`", "tokens/s", "first block after", "CPU s"], rows)


def ingest_rss() -> str:
    run = result("ingest_cpu")
    rows = [[f"{run['corpora'][name]['bytes'] / 1e6:,.0f} MB", f"{got['tokens'] / 1e6:.1f} M", str(got["shards"]),
             num(got["peak_rss_mb"])] for name, got in run["captures"].items()]
    return markdown(["corpus", "tokens", "shards", "peak RSS (MB)"], rows)


def _remote(name: str) -> str:
    run = result(name)
    labels = {"local": "local folder"}
    rows = []
    for source, speed in run["median_rows_per_s"].items():
        ahead = source.removeprefix("s3_read_ahead_")
        label = labels.get(source) or ("`s3://`, no read-ahead" if ahead == "0" else f"`s3://`, `--read-ahead {ahead}`")
        paired = run.get("median_paired_ratio_to_local", {}).get(source)
        first = run.get("median_seconds_to_first_batch", {}).get(source)
        cpu = run.get("median_cpu_s_per_epoch", {}).get(source)
        rows.append([label, num(speed), f"{run['ratio_to_local'][source]:.2f}",
                     "—" if paired is None else f"{paired:.2f}", "—" if first is None else f"{first:.2f} s",
                     "—" if cpu is None else f"{cpu['loader_process']:.2f} + {cpu['store_process']:.2f}"])
    return markdown(["source", "rows/s", "vs local", "paired", "first batch after",
                     "CPU s per epoch: loader + S3 server"], rows)


def remote_read() -> str:
    return _remote("remote_read_cpu")


def remote_read_small_shards() -> str:
    return _remote("remote_read_small_shards_cpu")


# --- cross-tokenizer distillation (issue 24) ----------------------------------------------------------


_UNIGRAM, _BPE = "Unigram 1,500 (another family)", "teacher's BPE 2,048"
_CROSS_TOKENIZER_ROWS = [  # (variant, student tokenizer, training, baseline variant)
    ("hard-labels", _UNIGRAM, "hard labels", "hard-labels"),
    ("prefix-groups", _UNIGRAM, "KD: prefix-groups (default)", "hard-labels"),
    ("prefix-map", _UNIGRAM, "KD: prefix-map", "hard-labels"),
    ("exact-map", _UNIGRAM, "KD: exact-map", "hard-labels"),
    ("first-byte", _UNIGRAM, "KD: first-byte", "hard-labels"),
    ("uld", _UNIGRAM, "KD: uld", "hard-labels"),
    ("exact-map+uld", _UNIGRAM, "KD: exact-map+uld", "hard-labels"),
    ("bpe-hard-labels", _BPE, "hard labels", "bpe-hard-labels"),
    ("bpe-cached-kd", _BPE, "KD: cached, same tokenizer", "bpe-hard-labels")]


def cross_tokenizer() -> str:
    """The Unigram student by hard labels and by each cross-tokenizer loss, the same architecture with the
    teacher's BPE tokenizer, and the teacher: held-out bits per byte (mean and max - min over the seeds)."""
    return _cross_tokenizer(_CROSS_TOKENIZER_ROWS)


def cross_tokenizer_summary() -> str:
    """The README's rows of :func:`cross_tokenizer`: hard labels, the default loss, the same-tokenizer pair."""
    return _cross_tokenizer([row for row in _CROSS_TOKENIZER_ROWS if row[0] in
                             ("hard-labels", "prefix-groups", "bpe-hard-labels", "bpe-cached-kd")])


def cross_tokenizer_800() -> str:
    """:func:`cross_tokenizer_summary` after twice the steps (800)."""
    return _cross_tokenizer([row for row in _CROSS_TOKENIZER_ROWS if row[0] in
                             ("hard-labels", "prefix-groups", "bpe-hard-labels", "bpe-cached-kd")],
                            name="cross_tokenizer_800_cpu")


def _cross_tokenizer(rows_of, *, name: str = "cross_tokenizer_cpu") -> str:
    r = result(name)["results"]
    rows = []
    for key, tokenizer, training, baseline in rows_of:
        if key not in r:
            continue
        v = r[key]
        gain = v["bits_per_byte_mean"] - r[baseline]["bits_per_byte_mean"]
        share = "" if v.get("aligned_share_mean") is None else f"{100 * v['aligned_share_mean']:.1f} %"
        rows.append([tokenizer, training, num(v["bits_per_byte_mean"], 3), num(v["bits_per_byte_spread"], 3),
                     "" if key == baseline else signed(gain, 3), share])
    rows.append(["teacher (BPE 2,048)", "", num(r["teacher"]["bits_per_byte"], 3), "", "", ""])
    return markdown(["student tokenizer", "training", "held-out bits/byte", "seed spread", "vs hard labels",
                     "aligned"], rows, right={2, 3, 4, 5})


TABLES = {render.__name__.replace("_", "-"): render for render in (
    demo, chat_example_caches, chat_example, k_sweep, tail_mass, kd_targets, cache_size,
    cache_size_large_vocab, demo_capture_sizes, fidelity, capture_throughput, capture_fused, train_step,
    loader_decode, loader_decode_llm, train_memory, fused_kd, ingest_data_path, ingest_rss, remote_read,
    remote_read_small_shards, classification_demo, classification_demo_seeds, classification_demo_threads,
    classification_demo_sweep, kill_soak_train, kill_soak_train_damaged, reader_verify, cross_tokenizer,
    cross_tokenizer_summary, cross_tokenizer_800)}


def doc_paths() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def unknown_tables(text: str) -> list[str]:
    """Names of the table markers in ``text`` that name no table, or that have no end marker."""
    closed = {m.start() for m in MARKED.finditer(text)}
    return [m.group("name") for m in OPENING.finditer(text) if m.group("name") not in TABLES or m.start() not in closed]


def rendered(text: str) -> str:
    """``text`` with every marked table rendered again from its JSON."""
    return MARKED.sub(lambda m: f"<!-- table: {m['name']} -->\n{TABLES[m['name']]()}<!-- end table -->", text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 when a table differs from its JSON")
    args = p.parse_args(argv)
    problems = []
    for path in doc_paths():
        text = path.read_text()
        if bad := unknown_tables(text):
            problems.append(f"{path.relative_to(REPO)}: unknown or unclosed table markers {bad} "
                            f"(known: {sorted(TABLES)})")
            continue
        new = rendered(text)
        if new == text:
            continue
        differing = [m["name"] for m in MARKED.finditer(text) if m["body"] != TABLES[m["name"]]()]
        if args.check:
            problems.append(f"{path.relative_to(REPO)}: tables {differing} differ from benchmarks/results "
                            "(run python benchmarks/tables.py)")
        else:
            path.write_text(new)
            print(f"rewrote {path.relative_to(REPO)}: {', '.join(differing)}")
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
