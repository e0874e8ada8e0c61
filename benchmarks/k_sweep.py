"""Which cache reaches online KD per byte (issues 15 and 25): top-k, sampled and mixed targets at equal bytes.

    python benchmarks/k_sweep.py --work /tmp/k-sweep --seeds 0 1 2 --threads 1 --out benchmarks/results/k_sweep_cpu.json
    python benchmarks/k_sweep.py --work W --budget 64 120 24:34 --no-references --skip-eval   # train one budget only
    python benchmarks/k_sweep.py --work W --seeds 0 1 2 --reuse-runs --out ...   # then score every finished run
    python benchmarks/k_sweep.py --work W --steps 20 --budget 8 8 4:4 --seeds 0 --out /tmp/smoke.json  # a quick check

On the shipped demo task (the settings of ``benchmarks/kd_targets.py``, which this script reuses: Llama
teacher ``data/teacher``, V = 2,048; Shakespeare training plays; student
``data/students/lm-student.json``; 800 steps of 16 x 128 tokens, lr 3e-3, warmup 20, alpha 0.9, T = 1,
forward KL) the same student is trained, per training seed (its initialisation and row order), with the
targets of each byte budget ``--budget K N K2:M`` (default: about 34, 61 and 115 B/token):

- ``top-K``: exact top-K targets, values quantized (the cache format's default); its bytes/token is
  the budget;
- ``sampled-N``: ``--sample N`` draws per position (no top-k), the unbiased importance-weighted estimator;
- ``mixed-K2+M``: exact top-K2 + M tail draws (``--top-k K2 --sample M``), the unbiased estimator;
- ``renorm-N`` (Gemma-3-style, unless ``--no-renormalised``): the ``sampled-N`` cache trained on biased
  targets: the teacher's probabilities at the unique drawn ids, renormalised over them,
  ``p~(i) = p_T(i) / sum_{j drawn} p_T(j)`` (zero elsewhere; draw counts and importance weights unused),
  and the loss ``T^2 KL(p~ || q_T)`` against the student's full softmax (:class:`RenormalisedDrawsTrainer`);

N and K2:M were chosen to cost what top-K does with ``kdpipe cache-teacher --dry-run --probe-rows 32``;
the real captures are checked against a 10% band and a miss is reported. Two references (unless
``--no-references``): ``online``: dense KD with the teacher in memory
(:class:`kdpipe.pipeline.train.online_kd.OnlineKDTrainer`, reading the rows of the first budget's top-k
cache, so its rows and order are the cached students'); ``hard-labels``: alpha = 0. ``--k`` adds
top-k rows outside any budget (e.g. 128 512).

Every cache is captured at T = 1 only, capture seed 0. Every student (and the teacher) is scored on the
held-out play by the library's ``evaluate_model(..., teacher=...)``, which is what ``kdpipe evaluate
--cache C --teacher T --json`` prints: ``ce``, ``kl_full`` (KL(teacher || student) over the full
vocabulary at T = 1, the teacher run on the rows), ``kl_topk_bins`` (the KL on the (k+1)-bin view of a
top-32 held-out cache: a lower bound of ``kl_full``) and ``top1_agreement``. Per variant the report
gives mean, sd, median and per-seed values, the CE and full-KL gaps to the online-KD student of the
same seed, the share of online KD's CE gain over hard labels that the variant loses, and
``reaches_online``: its mean full KL exceeds online KD's by at most online KD's seed sd.

The JSON report (command, machine, versions, git commit, the kdpipe it imported, settings, caches with
their bytes/token, per seed results, aggregates) goes to ``--out``, a Markdown table next to it (``.md``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kd_targets  # noqa: E402  (the shared capture, training and report helpers)

import kdpipe  # noqa: E402
from kdpipe.pipeline.evaluate.model import load_model  # noqa: E402
from kdpipe.pipeline.evaluate.run import evaluate_model  # noqa: E402
from kdpipe.pipeline.fileio import atomic_write_json  # noqa: E402
from kdpipe.pipeline.train.losses import hard_label_ce  # noqa: E402
from kdpipe.pipeline.train.trainer import Trainer  # noqa: E402

HELDOUT_K = 32  # the held-out cache whose (k+1)-bin KL is reported next to the full KL
METRICS = ("ce", "kl_full", "kl_topk_bins", "top1_agreement")
DEFAULT_BUDGETS = [["16", "18", "6:8"], ["32", "44", "12:16"], ["64", "120", "24:34"]]  # ~34, ~61, ~115 B/token


def renormalised_draws_kl(student_logits, sample_ids, sample_logprobs, *, temperature: float, mask) -> torch.Tensor:
    """Gemma-3-style sampled KD (biased): ``T^2 * mean over masked positions of KL(p~ || q_T)``.

    ``p~(i) = p_T(i) / sum_{j in D} p_T(j)`` on the unique drawn ids ``D`` of a sampled (k = 0) cache,
    zero elsewhere; ``q_T = softmax(student_logits / T)`` over the full vocabulary. Draw counts and
    importance weights are not used. ``student_logits [N, V]``, ``sample_ids [N, M]``,
    ``sample_logprobs [N, M]`` (log p_T, ``-inf`` at padding slots), ``mask [N]`` bool.
    """
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1).gather(1, sample_ids)  # [N, M]
    log_p = sample_logprobs.float()
    real = torch.isfinite(log_p)
    log_p_renorm = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)  # -inf stays -inf at padding
    p_renorm = torch.where(real, log_p_renorm.exp(), 0.0)
    per_position = torch.where(real, p_renorm * (log_p_renorm - log_q), 0.0).sum(dim=-1)  # [N]
    counted = mask & real.any(dim=-1)
    total = torch.where(counted, per_position, 0.0).sum()
    return temperature ** 2 * total / counted.sum().clamp_min(1)


class RenormalisedDrawsTrainer(Trainer):
    """The library's Trainer on a sampled cache, its KD term :func:`renormalised_draws_kl` (full student logits)."""

    def loss(self, batch: dict, *, temperature: float, alpha: float) -> dict:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        targets = self.targets(batch, temperature=temperature)  # masks, labels and the draws, as the sampled runs
        if targets.sample_ids is None or targets.topk_ids.shape[1]:
            raise ValueError("the renormalised-draws variant trains on a sampled cache (--sample, top-k 0)")
        logits = self.student_logits(batch)
        logits = logits.reshape(-1, logits.shape[-1]).float()  # [N, V]
        kd = renormalised_draws_kl(logits, targets.sample_ids.to(self.device), targets.sample_logprobs.to(self.device),
                                   temperature=temperature, mask=targets.kd_mask)
        ce = hard_label_ce(logits, targets.labels, mask=targets.ce_mask)
        return {"loss": alpha * kd + (1.0 - alpha) * ce, "kd": kd, "ce": ce}

    @property
    def loss_implementation(self) -> str:
        return ("biased, Gemma-3-style: teacher probabilities at the unique drawn ids renormalised over them, "
                "KL to the student's full softmax (benchmarks/k_sweep.py), full student logits")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One trained row: its cached targets (``kind``), the budget it belongs to, and how it trains."""
    name: str
    label: str
    kind: kd_targets.Targets | None  # None: online / hard labels
    budget: str | None  # the name of the budget's top-k variant
    cache: str  # the name of the cache it reads rows (and targets) from
    trainer_class: type | None = None


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    kd_targets.add_task_args(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budget", nargs=3, action="append", metavar=("K", "N", "K2:M"), default=None,
                   help="a byte budget: top-K, N draws and top-K2 + M tail draws of about the same bytes (repeat; "
                        "default: 16 18 6:8, 32 44 12:16, 64 120 24:34)")
    p.add_argument("--k", type=int, nargs="*", default=[], help="further top-k rows outside any budget")
    p.add_argument("--no-renormalised", action="store_true", help="skip the Gemma-3-style renormalised-draws rows")
    p.add_argument("--no-references", action="store_true", help="skip online KD and hard labels")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME",
                   help="train only these variants, in this order, capturing only the caches they read; score nothing "
                        "(e.g. one process per seed, then --reuse-runs without --only to score)")
    p.add_argument("--previous", default=None, metavar="JSON",
                   help="an earlier report of this script (a file, or COMMIT:PATH) whose --previous-rows are shown too, "
                        "marked as such")
    p.add_argument("--previous-rows", nargs="+", default=[], metavar="NAME", help="its variants to show")
    p.add_argument("--values", default="quantized", help="--values of every cache")
    p.add_argument("--heldout-rows", type=int, default=None, help="score only the first N held-out rows [default: all]")
    p.add_argument("--work", required=True, help="folder for caches and runs, kept (finished captures are reused)")
    p.add_argument("--reuse-runs", action="store_true",
                   help="take finished runs in --work (and their held-out scores) instead of training again")
    p.add_argument("--score-only", action="store_true",
                   help="with --reuse-runs: train nothing, score the finished runs (a row may then have fewer seeds)")
    p.add_argument("--skip-eval", action="store_true", help="capture and train only (score later with --reuse-runs)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="JSON report; the Markdown table goes next to it (.md)")
    args = p.parse_args()
    args.budget = args.budget or DEFAULT_BUDGETS
    return args


def plan_variants(args) -> list[Variant]:
    """Every row, budget by budget (top-k, sampled, mixed, renormalised), then the extra top-k rows and the references."""
    out = []
    for k, draws, mixed in args.budget:
        k, draws, (mk, mm) = int(k), int(draws), (int(x) for x in mixed.split(":"))
        top = kd_targets.Targets(f"top-{k}", f"top-{k}", k, args.values)
        sampled = kd_targets.Targets(f"sampled-{draws}", f"sampled ({draws} draws)", 0, args.values, draws)
        mix = kd_targets.Targets(f"mixed-{mk}+{mm}", f"mixed (top-{mk} + {mm} tail draws)", mk, args.values, mm)
        out += [Variant(t.name, t.label, t, top.name, t.name) for t in (top, sampled, mix)]
        if not args.no_renormalised:
            out.append(Variant(f"renorm-{draws}", f"renormalised draws, Gemma-3-style ({draws} draws, biased)",
                               None, top.name, sampled.name, RenormalisedDrawsTrainer))
    for k in args.k:
        t = kd_targets.Targets(f"top-{k}", f"top-{k}", k, args.values)
        out.append(Variant(t.name, t.label, t, None, t.name))
    if not args.no_references:
        first = out[0].cache
        out += [Variant("online", "online dense KD", None, None, first), Variant("hard-labels", "hard labels", None, None, first)]
    return out


def stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "median": statistics.median(values), "values": values}


def aggregate(per_seed: dict[int, dict], online: dict[int, dict] | None, hard: dict[int, dict] | None) -> dict:
    """Mean, sd and median over the seeds a row has of each metric; the gaps to online KD paired by seed (over
    the seeds both have); ``reaches_online``: the row's mean full KL exceeds online KD's mean (over all its
    seeds) by at most online KD's sd over seeds (its seed spread: a row's own larger spread does not count)."""
    rows = list(per_seed.values())
    out = {key: stats([r[key] for r in rows]) for key in METRICS if all(key in r for r in rows)}
    out["seeds"] = sorted(per_seed)
    if online:
        paired = [s for s in per_seed if s in online]
        out["ce_gap_to_online"] = stats([per_seed[s]["ce"] - online[s]["ce"] for s in paired])
        out["ce_gap_to_online_pct"] = stats([100 * (per_seed[s]["ce"] / online[s]["ce"] - 1) for s in paired])
        out["kl_full_gap_to_online"] = stats([per_seed[s]["kl_full"] - online[s]["kl_full"] for s in paired])
        reference = stats([o["kl_full"] for o in online.values()])
        out["reaches_online"] = out["kl_full"]["mean"] - reference["mean"] <= reference["sd"]
        if hard:
            both = [s for s in paired if s in hard]
            gain = {s: hard[s]["ce"] - online[s]["ce"] for s in both}  # online KD's CE gain over hard labels
            out["share_of_kd_gain_lost"] = stats([(per_seed[s]["ce"] - online[s]["ce"]) / gain[s] for s in both])
    return out


def fmt(stat: dict | None, digits: int = 3, signed: bool = False, unit: str = "") -> str:
    return kd_targets.fmt(stat, digits, signed, spread="sd", unit=unit)


def markdown(report: dict) -> str:
    s, n = report["settings"], len(report["settings"]["seeds"])
    lines = [
        f"Same student, {s['steps']} steps of {s['batch_size']} × {s['seq_len']} tokens, lr {s['lr']:g}, "
        f"α = {s['alpha']:g}, T = {s['temperature']:g}; held-out: {report['heldout_rows']} rows of the held-out play "
        f"({report['heldout_positions']:,} positions). Mean ± sd over {n} training seed{'s' if n > 1 else ''} "
        f"({', '.join(map(str, s['seeds']))}); the gaps are paired by seed. `kl_full`: KL(teacher ‖ student) over the "
        "full vocabulary (`kdpipe evaluate --teacher`); reaches online: mean full KL at most online KD's + its sd over seeds.",
        "",
        "| student | bytes/token | seeds | held-out CE | CE gap to online KD | full-vocabulary KL | full-KL gap to online KD | reaches online | top-1 agreement |",
        "|---|---:|---:|---:|---:|---:|---:|:---:|---:|",
    ]
    for v in report["variants"].values():
        a = v["aggregate"]
        bpt = f"{v['cache']['bytes_per_token']:.1f}" if v.get("bytes_from_cache") else v["bytes_note"]
        reach = {True: "yes", False: "no"}.get(a.get("reaches_online"), "—")
        lines.append(f"| {v['label']} | {bpt} | {len(a['ce']['values'])} | {fmt(a['ce'])} | {fmt(a.get('ce_gap_to_online_pct'), 1, True, '%')} | "
                     f"{fmt(a['kl_full'])} | {fmt(a.get('kl_full_gap_to_online'), 3, True)} | {reach} | "
                     f"{fmt(a['top1_agreement'])} |")
    t = report["teacher"]
    lines += [f"| teacher | — | — | {t['ce']:.3f} | — | 0 | — | — | 1 |", "", "```", report["command"], "```", ""]
    return "\n".join(lines)


def previous_report(args) -> dict | None:
    """The ``--previous`` report (a file, or COMMIT:PATH as an earlier commit holds it), checked comparable."""
    if not args.previous:
        return None
    if Path(args.previous).is_file():
        old = json.loads(Path(args.previous).read_text())
    else:
        old = json.loads(subprocess.run(["git", "show", args.previous], cwd=kd_targets.ROOT, capture_output=True,
                                        text=True, check=True).stdout)
    mismatched = [k for k in ("steps", "batch_size", "lr", "warmup", "alpha", "temperature", "values")
                  if old["settings"].get(k) != getattr(args, k)]
    if mismatched:
        raise SystemExit(f"--previous {args.previous} has other settings ({', '.join(mismatched)}): not comparable")
    return old


def previous_scores(old: dict, name: str) -> dict[int, dict]:
    return {int(s): run["heldout"] for s, run in old["variants"][name]["runs"].items()}


def previous_rows(args, old: dict, online: dict, hard: dict) -> dict:
    """The ``--previous-rows`` of the earlier report, labelled as such, their gaps paired with ``online``."""
    commit = old["git"]["commit"][:7] + (" + uncommitted changes" if old["git"].get("dirty") else "")
    out = {}
    for name in args.previous_rows:
        row = dict(old["variants"][name])
        reference = name in ("online", "hard-labels")
        label = {"sampled": f"sampled ({old['settings']['sample']} draws)"}.get(name, row["label"])
        if name == "mixed":
            k, m = old["settings"]["mixed"].split(":")
            label = f"mixed (top-{k} + {m} tail draws)"
        row.update(label=f"{label.removeprefix('cached ')}, previous sweep", budget=None, bytes_from_cache=not reference,
                   bytes_note={"online": "— (teacher in memory)", "hard-labels": "0"}.get(name),
                   aggregate=aggregate(previous_scores(old, name), online, hard),
                   previous={"report": args.previous, "commit": commit, "variant": name,
                             "note": "trained and scored by an earlier run of this script with the same settings"})
        out[f"previous-{name}"] = row
    return out


def recorded_caches(args, work: Path, variants: list[Variant]) -> dict:
    """``--score-only``: the finished captures' records from their manifests, each checked to hold its targets."""
    caches = {}
    for v in variants:
        if v.kind is None or v.name in caches:
            continue
        path = work / f"cache-{v.name}"
        manifest = json.loads((path / "manifest.json").read_text())
        held = {k: manifest["capture"][k] for k in ("top_k", "sample", "value_dtype", "seq_len", "teacher", "data")}
        wanted = {"top_k": v.kind.top_k, "sample": v.kind.sample, "value_dtype": v.kind.values, "seq_len": args.seq_len,
                  "teacher": args.teacher, "data": args.train_data}
        if held != wanted:
            raise SystemExit(f"{path} holds {held}, not {wanted}")
        caches[v.name] = {**kd_targets.cache_record(v.kind, manifest, 0.0), "capture_s": None, "path": str(path)}
    return caches


def capture_all(args, work: Path, variants: list[Variant]) -> dict:
    caches = {}
    for v in variants:
        if v.kind is None or v.name in caches:
            continue
        print(f"capturing {v.name} ({v.kind.settings_text()}) ...", flush=True)
        path = work / f"cache-{v.name}"
        manifest, seconds = kd_targets.capture(args, data=args.train_data, out=path, top_k=v.kind.top_k,
                                               values=v.kind.values, sample=v.kind.sample)
        caches[v.name] = {**kd_targets.cache_record(v.kind, manifest, seconds), "path": str(path)}
        print(f"  {caches[v.name]['bytes_per_token']:.1f} B/token", flush=True)
    return caches


def train_all(args, work: Path, variants: list[Variant], caches: dict) -> dict:
    """Train every variant for every seed (or reuse finished runs); (variant, seed) -> training record."""
    teacher = None
    if any(v.name == "online" for v in variants):
        teacher = load_model(args.teacher, device=torch.device(args.device)).module  # fp32, eval mode
    if args.only:
        by_name = {v.name: v for v in variants}
        unknown = [name for name in args.only if name not in by_name]
        if unknown:
            raise SystemExit(f"--only: no variants {unknown} (known: {', '.join(by_name)})")
        variants = [by_name[name] for name in args.only]
    runs = {}
    for seed in args.seeds:
        for v in variants:
            print(f"training {v.name}, seed {seed} ...", flush=True)
            runs[v.name, seed] = kd_targets.train(
                args, cache=Path(caches[v.cache]["path"]), run_dir=work / f"run-{v.name}-s{seed}", seed=seed,
                alpha=0.0 if v.name == "hard-labels" else args.alpha, teacher=teacher if v.name == "online" else None,
                trainer_class=v.trainer_class)
            print(f"  {runs[v.name, seed]['train_s']:.0f} s", flush=True)
    return runs


def scored(model: Path, record: Path, score: dict, reuse: bool) -> dict:
    """``evaluate_model`` of ``model`` (``score``: its keyword arguments), kept in ``record`` and taken from there
    with ``--reuse-runs`` when it was scored the same way (training a run again removes its run folder)."""
    key = {"model": str(model), **{k: str(v) for k, v in score.items()}}
    if reuse and record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("scored_with") == key:
            return saved["result"]
    result = evaluate_model(model, **score)
    atomic_write_json(record, {"scored_with": key, "result": result})
    return result


def finished_runs(args, work: Path, variants: list[Variant], caches: dict) -> dict:
    """``--score-only``: the finished runs in ``work`` (trained with these settings), none trained."""
    runs = {}
    for v in variants:
        for seed in args.seeds:
            record = kd_targets.reused_run(args, cache=Path(caches[v.cache]["path"]), run_dir=work / f"run-{v.name}-s{seed}",
                                           seed=seed, alpha=0.0 if v.name == "hard-labels" else args.alpha)
            if record is not None:
                runs[v.name, seed] = record
    return runs


def budgets_record(variants: list[Variant], caches: dict) -> dict:
    out = {}
    for top in dict.fromkeys(v.budget for v in variants if v.budget):
        bpt = caches[top]["bytes_per_token"]
        members = [v.cache for v in variants if v.budget == top and v.cache != top]
        out[top] = {"bytes_per_token": bpt, "tolerance": kd_targets.BYTES_TOLERANCE,
                    "deviation": {m: caches[m]["bytes_per_token"] / bpt - 1 for m in dict.fromkeys(members)}}
    return out


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started, work = time.perf_counter(), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    variants = plan_variants(args)
    if args.only:  # train these only: capture just the caches they read, score nothing
        needed = {v.cache for v in variants if v.name in args.only}
        train_all(args, work, variants, capture_all(args, work, [v for v in variants if v.name in needed]))
        return
    caches = recorded_caches(args, work, variants) if args.score_only else capture_all(args, work, variants)
    heldout = work / f"cache-heldout-top{HELDOUT_K}"
    if not args.score_only:
        kd_targets.capture(args, data=args.heldout_data, out=heldout, top_k=HELDOUT_K, values="float16")
    runs = finished_runs(args, work, variants, caches) if args.score_only else train_all(args, work, variants, caches)
    if args.skip_eval:
        return
    print("evaluating on the held-out play ...", flush=True)
    score = dict(cache=str(heldout), teacher=args.teacher, device=args.device, max_rows=args.heldout_rows)
    teacher_row = scored(Path(args.teacher), work / "teacher-heldout.json", score, args.reuse_runs)
    for (name, seed), record in runs.items():
        run_dir = work / f"run-{name}-s{seed}"
        record["heldout"] = scored(run_dir / "model", run_dir / "heldout.json", score, args.reuse_runs)
        h = record["heldout"]
        print(f"  {name} s{seed}: ce {h['ce']:.4f}, kl_full {h['kl_full']:.4f}, kl_topk_bins {h['kl_topk_bins']:.4f}",
              flush=True)
    variants = [v for v in variants if any(n == v.name for n, _ in runs)]  # --score-only: rows with a finished run
    results = {v.name: {s: runs[v.name, s]["heldout"] for s in args.seeds if (v.name, s) in runs} for v in variants}
    old = previous_report(args)
    online = results.get("online") or (previous_scores(old, "online") if old else None)
    hard = results.get("hard-labels") or (previous_scores(old, "hard-labels") if old else None)
    notes = {"online": "— (teacher in memory)", "hard-labels": "0"}
    report = {
        "command": shlex.join(["python", *sys.argv]), "machine": kd_targets.machine(),
        "versions": kd_targets.versions(), "git": kd_targets.git_state(),
        "kdpipe_imported_from": str(Path(kdpipe.__file__).resolve().parent),
        "settings": {**{k: getattr(args, k) for k in ("teacher", "train_data", "heldout_data", "student", "seq_len",
                                                      "steps", "batch_size", "lr", "warmup", "alpha", "temperature",
                                                      "seeds", "budget", "k", "values")},
                     "capture_temperatures": [1.0], "capture_seed": 0, "loss": "forward-kl"},
        "references": {"online": "this run" if results.get("online") else args.previous,
                       "hard-labels": "this run" if results.get("hard-labels") else args.previous},
        "budgets": budgets_record([v for v in variants if v.budget in caches], caches),
        "heldout_rows": teacher_row["rows"], "heldout_positions": teacher_row["positions"], "teacher": teacher_row,
        "caches": caches,
        "variants": {v.name: {"label": v.label, "budget": v.budget, "trained_from_cache": v.cache,
                              "settings": v.kind.settings_text() if v.kind else None,
                              "cache": caches.get(v.cache), "bytes_from_cache": v.name not in notes,
                              "bytes_note": notes.get(v.name),
                              "runs": {str(s): runs[v.name, s] for s in args.seeds if (v.name, s) in runs},
                              "aggregate": aggregate(results[v.name], online, hard)}
                     for v in variants},
        "wall_s": round(time.perf_counter() - started, 1),
        "timings_note": "train_s per run are wall-clock on a 2-core machine shared with other jobs: noisy",
    }
    if old:
        report["variants"].update(previous_rows(args, old, online, hard))
    print(markdown(report))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        out.with_suffix(".md").write_text(markdown(report))
        print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
