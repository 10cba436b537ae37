"""Forgetting on the real medical stream for every method: hyper-parameter search on dev, seeds on test.

Stream: NCBI-disease -> BC5CDR-disease -> BC5CDR-chemical on the packaged all-MiniLM-L6-v2 (dual encoder),
with the budget of ``--recipe`` (default ``recipes/el_stream_forgetting.yaml``: subsets and epochs that fit a
2-core CPU, at a learning rate where plain fine-tuning forgets measurably; ``recipes/el_stream_full.yaml`` is the
full-budget configuration for a GPU). All runs share one process, so the tasks (dictionaries, TF-IDF negatives)
are built once per split and the untouched model is encoded once.

1. Search, dev splits only, seed 0: ``continual_lambda`` for ewc and kfac, ``fish_keep_ratio`` for fish; the
   value with the highest dev ACC (mean final acc@1 over the tasks) is kept. online_ewc uses ewc's lambda;
   fish+kfac uses fish's keep ratio and kfac's lambda.
2. Test splits: none, ewc, kfac, kfac_per_task (K-FAC keeping one factor pair per task instead of merging
   them) and fish with ``--seeds`` (default 0 1 2); online_ewc, fish+kfac, replay, joint are started with the
   first seed only, and their finished runs at the other seeds (run with ``--methods joint --seeds 1``) are
   aggregated too. The seed is the training seed (data order, sampled Fisher labels); the sampled
   training and evaluation mentions are the same in every run.

Every run writes ``OUT/runs/<split>/<method>/seed<k>/results.json`` (+ heatmap and table); a run whose
results.json exists with the same settings and recipe budget is not repeated (with others it is run again), and
an interrupted run resumes from its last finished task. Several processes may share one OUT (e.g. two one-thread
workers on two cores): each run is claimed by one live process (``.running`` in its directory), the others skip
it and list it as running elsewhere; a search is decided only once every value has its result. At the end
``OUT/summary.json`` and ``OUT/summary.md`` hold the search table (with each value's dev plasticity;
``OUT/search_curve.png`` draws it as a stability-plasticity curve, forgetting against plasticity) and the
forgetting table (mean and sample standard deviation over seeds) and ``OUT/heatmap_<method>.png`` the seed-mean accuracy matrices (with the start row and the change from each
task's own score; ``--replot`` redraws them from ``summary.json`` alone);
``bench/tables.py`` (run by ``make bench`` after every bench) puts this table beside the cost table of the
other benches in ``bench/results/tables.md``.

Configurations (``--config``; ``--recipe``/``--out``/``--set`` given explicitly still win):

- ``el3`` (default): the 3-task stream above, ``bench/results/forgetting``;
- ``species4``: NCBI-disease -> BC5CDR-chemical -> S800-species -> BC5CDR-disease (``recipes/el_stream_species.yaml``:
  whole training splits; a new entity type in third place), ``bench/results/forgetting_species4``;
- ``species4_mirror``: the same tasks in the mirror order, ``bench/results/forgetting_species4_mirror``.

- ``full``: the issue-21 budget on the species stream (``recipes/el_stream_species_full.yaml``: whole training
  splits, up to 1,000 test mentions per task, every gold name of every split + 20,000 sampled names, training
  names out of the dictionary), ``bench/results/forgetting_full[/<start>]``; ``full_mirror``: its mirror order.

``--start aligned --aligned-model DIR`` starts every run from an encoder written by ``hf-continual pretrain``;
``--start aligned+state`` also loads its task-0 continual state (the alignment's curvature) before the first
task, for the runs of the state's own method (the others are listed as not run: they equal ``aligned``).

``--methods`` runs only the listed test-split methods (and ``alone`` for the tasks trained alone); ``--chosen
kfac.continual_lambda=1e6`` fixes a method's setting instead of searching it on dev (a run's settings are part of
its cache key, so a run is reused only when they match).

Usage: ``HF_HUB_OFFLINE=1 python bench/forgetting.py [--config el3] [--data-dir ../shared/data] [--out DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# lambdas for the penalty added after gradient clipping (2026-12-02); the grid of the tables in the README that
# predate that fix was 1e3-1e5 (bench/clip_check.py: the same penalties need about 100x more now)
SEARCH: dict[str, tuple[str, list[float]]] = {
    "ewc": ("continual_lambda", [1e4, 1e5, 1e6, 1e7]),
    "kfac": ("continual_lambda", [1e5, 1e6, 1e7]),
    "fish": ("fish_keep_ratio", [0.005, 0.05]),
}
SEEDED = ["none", "ewc", "kfac", "kfac_per_task", "fish"]
PAIRED = [
    ("kfac", "ewc"),
    ("kfac", "none"),
    ("ewc", "none"),
    ("kfac", "joint"),
]  # per-seed differences reported
SINGLE = ["online_ewc", "fish+kfac", "replay", "joint"]
ORDER = ["none", "ewc", "online_ewc", "kfac", "kfac_per_task", "fish", "fish+kfac", "replay", "joint"]
# the per-task tables of the summary: aggregate key -> caption
PER_TASK_TABLES = {
    "drop_below_start": "Drop below the start model by the end of the stream, per task (start acc@1 - final acc@1, "
    "x100; > 0: knowledge the start model had and the stream lost):",
    "own_gain_per_task": "Own-training gain per task (its score right after its own training - its score just "
    "before it; the start model's for the first task; x100): what each task's training taught the model of it.",
}
#: K-FAC's grid on whole training splits: from 1e5 up the penalty pins the model (the same dev matrix at 1e5 and
#: 1e6), so the grid reaches down to where it lets go and the choice is bracketed: the stability-plasticity curve
KFAC_WIDE_GRID = [1e3, 1e4, 1e5, 1e6, 1e7]
MIRROR_SPECIES4 = "tasks=[bc5cdr-disease, s800-species, bc5cdr-chemical, ncbi-disease]"
CONFIGURATIONS: dict[str, dict[str, Any]] = {
    "el3": {"recipe": "recipes/el_stream_forgetting.yaml", "out": "bench/results/forgetting", "set": []},
    "species4": {
        "recipe": "recipes/el_stream_species.yaml",
        "out": "bench/results/forgetting_species4",
        "set": [],
        "search": {"kfac": KFAC_WIDE_GRID},
    },
    "species4_mirror": {
        "recipe": "recipes/el_stream_species.yaml",
        "out": "bench/results/forgetting_species4_mirror",
        "set": [MIRROR_SPECIES4],
        "search": {"kfac": KFAC_WIDE_GRID},
    },
    "full": {
        "recipe": "recipes/el_stream_species_full.yaml",
        "out": "bench/results/forgetting_full",
        "set": [],
        "search": {"kfac": KFAC_WIDE_GRID},
    },
    "full_mirror": {
        "recipe": "recipes/el_stream_species_full.yaml",
        "out": "bench/results/forgetting_full_mirror",
        "set": [MIRROR_SPECIES4],
    },
}
#: start models (``--start``): the packaged MiniLM, or the aligned encoder (``--aligned-model``) without or with
#: its task-0 continual state (the alignment's curvature) loaded before the first task
STARTS = ("minilm", "aligned", "aligned+state")


def start_overrides(start: str, aligned_model: str | None) -> list[str]:
    """Recipe ``--set`` items of a start model."""
    if start == "minilm":
        return []
    if not aligned_model:
        raise SystemExit(
            f"--start {start} needs --aligned-model DIR (a directory written by hf-continual pretrain)"
        )
    if not Path(aligned_model).is_dir():
        raise SystemExit(f"--aligned-model {aligned_model!r}: not a directory")
    items = [f"model={Path(aligned_model).resolve()}"]
    return items + (["initial_state=model"] if start == "aligned+state" else [])


def parse_chosen(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["kfac.continual_lambda=1e6", ...]`` -> ``{"kfac": {"continual_lambda": 1e6}}`` (values YAML-typed)."""
    from hf_continual.config import load_yaml

    chosen: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        method, dot, param = key.partition(".")
        if not (sep and dot) or method not in SEARCH or param != SEARCH[method][0]:
            allowed = ", ".join(f"{m}.{p}" for m, (p, _) in SEARCH.items())
            raise SystemExit(
                f"--chosen {item!r}: expected METHOD.PARAM=VALUE with METHOD.PARAM one of {allowed}"
            )
        chosen.setdefault(method, {})[param] = load_yaml(raw)
    return chosen


def method_overrides(method: str, chosen: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """ContinualConfig fields of a bench method name (``fish+kfac`` = FISH masks with a K-FAC penalty)."""
    if method == "fish+kfac":
        return {
            "continual_method": "fish",
            "fish_penalty": "kfac",
            **chosen.get("fish", {}),
            **chosen.get("kfac", {}),
        }
    if method == "online_ewc":
        return {"continual_method": "online_ewc", **chosen.get("ewc", {})}
    if method == "kfac_per_task":  # the other cross-task mode of K-FAC (default: merged), same lambda
        return {"continual_method": "kfac", "kfac_cross_task": "per_task", **chosen.get("kfac", {})}
    return {"continual_method": method, **chosen.get(method, {})}


def _budget_of(resolved: dict[str, Any]) -> dict[str, Any]:
    """The parts of a resolved recipe that change what a run measures, JSON-normalised so a recipe read back from
    results.json compares equal to the live one. Not the name, paths, or the recipe's own method and lambda: every
    bench run sets its method, and its lambda wherever the method has a penalty, in its overrides."""
    keys = ("model", "num_hidden_layers", "scale", "tasks", "task_options", "training", "initial_state")
    out = json.loads(json.dumps({k: resolved.get(k) for k in keys}, default=str))
    if resolved.get("corpora"):  # corpora declared in the recipe (results older than that key have none)
        out["corpora"] = json.loads(json.dumps(resolved["corpora"]))
    for k in ("continual_method", "continual_lambda"):
        (out.get("training") or {}).pop(k, None)
    return out


class Bench:
    """Builds the tasks of a split once and runs (cached, resumable) streams on fresh copies of the model."""

    def __init__(self, recipe: Any, out: Path, show_progress: bool, only_finished: bool = False) -> None:
        self.recipe = recipe
        self.only_finished = only_finished
        self.missing: dict[str, str] = {}  # run -> why it has no result ("" when it was not started)
        self.partial: list[
            dict[str, Any]
        ] = []  # unfinished runs: the rows of R saved after each finished task
        self.out = out
        self.show_progress = show_progress
        self._tasks: dict[str, list[Any]] = {}

    def tasks(self, split: str) -> list[Any]:
        if split not in self._tasks:
            from hf_continual.recipe import resolve_model_name
            from hf_continual.tasks.entity_linking import DualEncoderModel, build_entity_linking_task

            tokenizer = DualEncoderModel.from_base(
                resolve_model_name(self.recipe.model), num_hidden_layers=self.recipe.num_hidden_layers
            ).get_tokenizer()
            options = {**self.recipe.task_options, "split": split, "show_progress": self.show_progress}
            tasks = [
                build_entity_linking_task(
                    n, self.recipe.data_dir, tokenizer, corpora=self.recipe.corpora, **options
                )
                for n in self.recipe.tasks
            ]
            for t in tasks:  # start, after task 1..3: the untouched model stays cached across runs
                t.evaluator.cache_size = max(t.evaluator.cache_size, len(tasks) + 1)
            self._tasks[split] = tasks
        return self._tasks[split]

    def first_task(self, split: str, seed: int, only: int | None) -> dict[str, Any]:
        """``run_stream``'s shared first task for a stream run: the first task trains the same way under every
        method with a plain first task (all but FISH), so one run of a seed trains and evaluates it and the
        others of that seed take it (tested to end with the same R and weights). Keyed by the recipe's budget,
        the split and the seed; ``OUT/runs/<split>/_first_task/seed<k>`` (weights: not results, git-ignored)."""
        if only is not None:  # a task trained alone: evaluated on that task only, not a stream's first row
            return {}
        key = json.dumps(
            {"budget": _budget_of(self.recipe.resolved()), "split": split, "seed": seed}, sort_keys=True
        )
        return {
            "first_task_dir": self.out / "runs" / split / "_first_task" / f"seed{seed}",
            "first_task_key": key,
        }

    def _note_partial(self, run_dir: Path, label: str) -> None:
        """Record the rows of R an unfinished run saved so far (``progress/progress.json``), if any."""
        for sub in ("progress", "progress.old"):
            path = run_dir / sub / "progress.json"
            if path.is_file():
                record = json.loads(path.read_text())
                self.partial.append(
                    {
                        "run": label,
                        "tasks_done": len(record["R"]),
                        "initial": record["initial"],
                        "R": record["R"],
                        "timings": record["timings"],
                    }
                )
                return

    def run(
        self,
        split: str,
        name: str,
        seed: int,
        overrides: dict[str, Any],
        only: int | None = None,
        start: bool = True,
    ) -> dict[str, Any] | None:
        """results.json of one stream run (read from disk when it exists); ``only``: train task ``only`` alone.
        With ``only_finished``, a run not on disk is not started: None (and listed in ``self.missing``). With
        ``start=False`` likewise, but unlisted: a run that is welcome if it exists and not owed if it does not."""
        run_dir = self.out / "runs" / split / name / f"seed{seed}"
        label = f"{split}/{name}/seed{seed}"
        result = self._result(run_dir, label, split, name, seed, overrides, only, start)
        if result is not None:
            self.missing.pop(label, None)  # it was running elsewhere when first asked for, and has finished
        return result

    def _result(
        self,
        run_dir: Path,
        label: str,
        split: str,
        name: str,
        seed: int,
        overrides: dict[str, Any],
        only: int | None,
        start: bool = True,
    ) -> dict[str, Any] | None:
        from hf_continual.stream import RESULTS_FILE, load_results

        finished_only = self.only_finished or not start

        if (
            self.recipe.initial_state is not None
        ):  # --start aligned+state: only the state's own method uses it
            from hf_continual.state import read_state_record

            state_method = read_state_record(self.recipe.initial_state)["method"]
            if overrides["continual_method"] != state_method:
                self.missing[label] = (
                    f"the start state is {state_method}'s; this method starts from the aligned model without it: "
                    "--start aligned"
                )
                return None
        if (run_dir / RESULTS_FILE).exists():
            cached = load_results(run_dir / RESULTS_FILE)
            same_budget = _budget_of(cached["extra"].get("recipe", {})) == _budget_of(self.recipe.resolved())
            if cached["extra"]["bench"]["overrides"] == overrides and same_budget:
                return cached
            # the search chose other settings, or the recipe changed, since this run: it measured something else
            why = cached["extra"]["bench"]["overrides"] if same_budget else "another recipe budget"
            if finished_only:
                print(f"stale run {run_dir} ({why}): not used")
                if start:
                    self.missing[label] = "stale settings"
                return None
            print(f"stale run {run_dir} ({why}): running again")
            shutil.rmtree(run_dir)
        if finished_only:
            if start:
                self.missing[label] = ""
                self._note_partial(run_dir, label)
            return None
        lock = claim_run(run_dir)
        if lock is None:
            self.missing[label] = "running in another process"
            return None
        try:
            return self._run_claimed(run_dir, split, name, seed, overrides, only)
        finally:
            lock.unlink(missing_ok=True)

    def _run_claimed(
        self, run_dir: Path, split: str, name: str, seed: int, overrides: dict[str, Any], only: int | None
    ) -> dict[str, Any]:
        from _setup import machine_info  # bench/ is on sys.path when this file runs as a script

        from hf_continual.recipe import resolve_model_name
        from hf_continual.stream import RESULTS_FILE, load_results, run_stream
        from hf_continual.tasks.entity_linking import DualEncoderModel

        if (run_dir / RESULTS_FILE).exists():  # another process finished it between our check and our claim
            return load_results(run_dir / RESULTS_FILE)
        tasks = self.tasks(split) if only is None else self.tasks(split)[only : only + 1]
        print(f"\n=== {split} {name} seed {seed} {overrides}", flush=True)
        model = DualEncoderModel.from_base(
            resolve_model_name(self.recipe.model), num_hidden_layers=self.recipe.num_hidden_layers
        )
        args = self.recipe.config(
            **{**overrides, "seed": seed, "output_dir": str(run_dir), "disable_tqdm": not self.show_progress}
        )
        extra = {
            "bench": {"split": split, "method": name, "seed": seed, "overrides": overrides},
            "recipe": self.recipe.resolved(),
            "tasks_info": {t.name: t.info for t in tasks},
            # where it ran: a first task retrained on another CPU differs in the last bits, and so by a few
            # mentions per task, from one trained here (the same seed and code)
            "machine": {k: v for k, v in machine_info().items() if k != "load_avg_1m_at_end"},
        }
        t0 = time.perf_counter()
        result = run_stream(
            model,
            tasks,
            args,
            output_dir=run_dir,
            extra=extra,
            resume=True,
            initial_state=self.recipe.initial_state,
            **self.first_task(split, seed, only),
        )
        print(f"--- {split} {name} seed {seed}: {time.perf_counter() - t0:.0f} s, metrics {result.metrics}")
        for scratch in ("progress", "tasks"):  # model copies and Trainer logs: not results
            shutil.rmtree(run_dir / scratch, ignore_errors=True)
        return load_results(run_dir / RESULTS_FILE)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def claim_run(run_dir: Path) -> Path | None:
    """Claim ``run_dir`` for this process (``run_dir/.running`` holds its pid, created exclusively), so that two
    bench processes on one OUT (two cores, one thread each) never train the same run; None while a live process
    holds it. A claim left by a dead process is taken over (the run resumes from its last finished task)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / ".running"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = int(lock.read_text().strip() or "0")
            except (OSError, ValueError):  # being written by its creator this instant: held
                return None
            if holder and _pid_alive(holder):
                return None
            lock.unlink(missing_ok=True)  # its process is gone
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        return lock
    return None


def mean_std(values: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
        "values": values,
    }


def search_grids(configuration: dict[str, Any]) -> dict[str, tuple[str, list[float]]]:
    """The dev search of a configuration: ``SEARCH`` with the grids its ``search`` entry replaces."""
    own = configuration.get("search", {})
    return {method: (param, list(own.get(method, grid))) for method, (param, grid) in SEARCH.items()}


def choose_value(found: dict[float, dict[str, Any] | None]) -> float | None:
    """The searched value with the highest dev ACC (ties: the smaller value, the weaker penalty); None while any
    value has no result yet (not run, or running in another process): a search is chosen only when complete."""
    if not found or any(res is None for res in found.values()):
        return None
    return max(found, key=lambda value: (found[value]["metrics"]["acc"], -value))


def plasticity(result: dict[str, Any]) -> float:
    """Mean over tasks of each task's score right after its own training (mean of R[j][j])."""
    R = result["accuracy_matrix"]
    return statistics.fmean(R[j][j] for j in range(len(R)))


def own_gain(result: dict[str, Any]) -> list[float]:
    """Per task, what its own training added to its score: R[j][j] - R[j-1][j] (the start model's score for the
    first task). Near 0 everywhere with no forgetting means the tasks were protected rather than learned."""
    R, initial = result["accuracy_matrix"], result["initial"]
    return [R[j][j] - (R[j - 1][j] if j else initial[j]) for j in range(len(R))]


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean/std over seeds of ACC, BWT, forgetting, final-task score; the seed-mean R."""
    out: dict[str, Any] = {}
    for key in ("acc", "bwt", "fwt", "forgetting"):
        vals = [r["metrics"][key] for r in runs if r["metrics"].get(key) is not None]
        if vals:
            out[key] = mean_std(vals)
    out["final_task"] = mean_std([r["accuracy_matrix"][-1][-1] for r in runs])
    T = len(runs[0]["tasks"])
    # plasticity: each task's score right after its own training; the drop below the start model: what the
    # start model knew of task j and the stream lost by its end (b[j] - R[T-1][j], > 0 = lost)
    out["plasticity"] = mean_std([plasticity(r) for r in runs])
    out["own_gain"] = mean_std([statistics.fmean(own_gain(r)) for r in runs])
    out["own_gain_per_task"] = [mean_std([own_gain(r)[j] for r in runs]) for j in range(T)]
    out["drop_below_start"] = [
        mean_std([r["initial"][j] - r["accuracy_matrix"][-1][j] for r in runs]) for j in range(T)
    ]
    sizes = [r["timings"]["state_bytes"][-1] for r in runs if r["timings"].get("state_bytes")]
    out["state_bytes"] = statistics.fmean(sizes) if sizes else None
    out["mean_R"] = [
        [statistics.fmean(r["accuracy_matrix"][i][j] for r in runs) for j in range(T)] for i in range(T)
    ]
    out["mean_initial"] = [statistics.fmean(r["initial"][j] for r in runs) for j in range(T)]
    out["train_s"] = statistics.fmean(sum(r["timings"]["train_s"]) for r in runs)
    out["consolidate_s"] = statistics.fmean(sum(r["timings"]["consolidate_s"]) for r in runs)
    out["stream_min"] = statistics.fmean(stream_seconds(r) for r in runs) / 60
    out["first_task_shared"] = sum("first_task_from" in r["timings"] for r in runs)
    out["seeds"] = [r["extra"]["bench"]["seed"] for r in runs]
    out["overrides"] = runs[0]["extra"]["bench"]["overrides"]
    return out


def paired_difference(
    runs_a: list[dict[str, Any]], runs_b: list[dict[str, Any]], keys: tuple[str, ...] = ("acc", "forgetting")
) -> dict[str, Any] | None:
    """Per-seed differences a - b of the metrics over the seeds both methods ran (mean, sample std, values):
    the seed's data order and sampled labels are shared, so the spread of the difference is what says whether
    two methods differ, not the overlap of their separate spreads. ``same_first_row``: the pairs whose rows
    after the first task are equal, i.e. whose first task was one model (shared, or retrained identically); a
    first task retrained on another CPU can differ by a few mentions per task, which then adds to the spread.
    None without a common seed."""
    by_seed_b = {r["extra"]["bench"]["seed"]: r for r in runs_b}
    pairs = [
        (r, by_seed_b[r["extra"]["bench"]["seed"]])
        for r in runs_a
        if r["extra"]["bench"]["seed"] in by_seed_b
    ]
    if not pairs:
        return None
    out: dict[str, Any] = {"seeds": [a["extra"]["bench"]["seed"] for a, _ in pairs]}
    # exact: each entry is correct / mentions of the same counts, one correctly rounded division on any CPU
    out["same_first_row"] = sum(a["accuracy_matrix"][0] == b["accuracy_matrix"][0] for a, b in pairs)
    for key in keys:
        vals = [a["metrics"][key] - b["metrics"][key] for a, b in pairs]
        out[key] = mean_std(vals)
    return out


def entity_types_of(recipe: Any) -> dict[str, str]:
    """Task name -> entity type from the corpus declarations (recipe corpora, then the built-in registry)."""
    from hf_continual.tasks.entity_linking import resolve_corpus

    out = {}
    for name in recipe.tasks:
        try:
            out[name] = resolve_corpus(name, recipe.corpora).entity_type
        except KeyError:
            pass
    return out


def stream_seconds(result: dict[str, Any]) -> float:
    """Wall seconds of one stream run: every training, consolidation and evaluation, the initial one included."""
    t = result["timings"]
    parts = ("train_s", "consolidate_s", "evaluate_s")
    return t.get("initial_evaluate_s", 0.0) + sum(sum(t.get(k, [])) for k in parts)


def plot_method_heatmaps(out: Path, tasks: list[str], methods: dict[str, dict[str, Any]]) -> None:
    """``OUT/heatmap_<method>.png``: the seed-mean R with the start row and the change-from-own-score panel,
    whose colour scale is shared by all methods (the largest change after training in any of them)."""
    from hf_continual.report import forgetting_deltas

    span = max(
        (
            abs(d[i][j])
            for agg in methods.values()
            for d in [forgetting_deltas(agg["mean_R"])]
            for i in range(len(d))
            for j in range(i + 1)
        ),
        default=None,
    )
    for name, agg in methods.items():
        plot_method_heatmap(out, name, tasks, agg, span)


def plot_search_curve(out: Path, rows: list[dict[str, Any]]) -> Path | None:
    """``OUT/search_curve.png``: the dev search as a stability-plasticity curve, forgetting against plasticity
    (mean R[j][j]) for every searched value of every method, with none's point; None without searched rows."""
    if not any(row["method"] != "none" for row in rows):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for method in dict.fromkeys(row["method"] for row in rows):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["value"])
        xs = [100 * r["plasticity"] for r in mine]
        ys = [100 * r["metrics"]["forgetting"] for r in mine]
        ax.plot(xs, ys, marker="o", linestyle="-" if len(mine) > 1 else "none", label=method)
        if method != "none":  # values that landed on the same point share one label
            labels: dict[tuple[float, float], list[str]] = {}
            for r, x, y in zip(mine, xs, ys):
                labels.setdefault((x, y), []).append(f"{r['value']:g}")
            for (x, y), values in labels.items():
                ax.annotate(", ".join(values), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("dev plasticity: mean acc@1 right after own training (x100)")
    ax.set_ylabel("dev forgetting (x100)")
    ax.set_title("Stability-plasticity on dev (labels: searched value)")
    ax.legend()
    fig.tight_layout()
    path = out / "search_curve.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_method_heatmap(
    out: Path, name: str, tasks: list[str], agg: dict[str, Any], delta_range: float | None = None
) -> None:
    """``OUT/heatmap_<method>.png`` of one method (see :func:`plot_method_heatmaps`)."""
    from hf_continual.report import plot_heatmap

    n = len(agg["seeds"])
    plot_heatmap(
        tasks,
        agg["mean_R"],
        out / f"heatmap_{name.replace('+', '_')}.png",
        title=f"{name} (mean of {n} seed{'s' if n > 1 else ''})",
        metric_name="acc@1",
        initial=agg["mean_initial"],
        delta_range=delta_range,
    )


def fmt(stat: dict[str, Any] | None, scale: float = 100.0) -> str:
    if not stat:
        return "n/a"
    if stat.get("std") is None:
        return f"{scale * stat['mean']:.2f}"
    return f"{scale * stat['mean']:.2f} ± {scale * stat['std']:.2f}"


def write_markdown(summary: dict[str, Any], path: Path) -> None:
    from hf_continual.state import atomic_write_text

    lines = [f"Budget: {summary['budget']}", ""]
    if summary.get("stream"):
        lines += [f"Stream (training order; the heatmaps and matrices follow it): {summary['stream']}", ""]
    fixed = summary.get("fixed") or {}
    if fixed:
        settings = "; ".join(
            f"{m} " + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in s.items())
            for m, s in fixed.items()
        )
        lines += [f"Not searched here: fixed with --chosen ({settings}).", ""]
    if summary["search"] or not fixed:
        lines += ["Search (dev splits, seed 0; criterion: dev ACC):", ""]
        lines += [
            "| method | value | dev ACC | dev BWT | dev forgetting | dev plasticity | kept |",
            "|---|---|---|---|---|---|---|",
        ]
    for row in summary["search"]:
        m = row["metrics"]
        setting = "-" if row["param"] == "-" else f"{row['param']}={row['value']:g}"
        plast = "n/a" if row.get("plasticity") is None else f"{100 * row['plasticity']:.2f}"
        lines.append(
            f"| {row['method']} | {setting} | {100 * m['acc']:.2f} | {100 * m['bwt']:.2f} | "
            f"{100 * m['forgetting']:.2f} | {plast} | {'yes' if row['kept'] else ''} |"
        )
    if any(row["method"] != "none" for row in summary["search"]):
        lines += [
            "",
            "Stability-plasticity on dev (`search_curve.png`): forgetting against plasticity (each task's score "
            "right after its own training) for every searched value; none is the unprotected point.",
        ]
    lines += ["", "Test splits (acc@1 x100; mean ± sample std over seeds):", ""]
    lines += [
        "| method | settings | seeds | ACC | BWT | forgetting | forgetting reduction vs none | plasticity | "
        "own-training gain | final-task acc@1 | train s | consolidate s | state MB | minutes per stream |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ORDER:
        agg = summary["methods"].get(name)
        if agg is None:
            continue
        settings = (
            ", ".join(f"{k}={v}" for k, v in agg["overrides"].items() if k != "continual_method") or "-"
        )
        red = agg.get("forgetting_reduction")
        state_mb = "n/a" if agg.get("state_bytes") is None else f"{agg['state_bytes'] / 1e6:.1f}"
        lines.append(
            f"| {name} | {settings} | {len(agg['seeds'])} | {fmt(agg.get('acc'))} | {fmt(agg.get('bwt'))} | "
            f"{fmt(agg.get('forgetting'))} | {'n/a' if red is None else f'{100 * red:.0f}%'} | "
            f"{fmt(agg.get('plasticity'))} | {fmt(agg.get('own_gain'))} | {fmt(agg['final_task'])} | "
            f"{agg['train_s']:.0f} | "
            f"{agg['consolidate_s']:.0f} | {state_mb} | {agg['stream_min']:.0f} |"
        )
    shared = {
        n: agg["first_task_shared"] for n, agg in summary["methods"].items() if agg.get("first_task_shared")
    }
    if shared:
        lines += [
            "",
            "Runs that took their first task from another run of their seed (the same training; run_stream's "
            "first_task_dir): "
            + ", ".join(f"{n} {k}" for n, k in shared.items())
            + ". Their train s and minutes "
            "per stream count that task's training and evaluation as their own (what the method costs); the bench "
            "spent that time once per seed.",
        ]
    for key, caption in PER_TASK_TABLES.items():
        rows = [(n, summary["methods"][n]) for n in ORDER if summary["methods"].get(n, {}).get(key)]
        if rows:
            lines += ["", caption, "", "| method | " + " | ".join(summary["tasks"]) + " |"]
            lines += ["|---|" + "---|" * len(summary["tasks"])]
            lines += [f"| {n} | " + " | ".join(fmt(d) for d in agg[key]) + " |" for n, agg in rows]
    if summary.get("paired"):
        lines += ["", "Paired per-seed differences (x100; mean ± sample std over the common seeds):", ""]
        lines += [
            "| difference | seeds | same first-task row | ACC | forgetting |",
            "|---|---|---|---|---|",
        ]
        for label, diff in summary["paired"].items():
            n = len(diff["seeds"])
            lines.append(
                f"| {label} | {n} | {diff['same_first_row']} of {n} | {fmt(diff.get('acc'))} | "
                f"{fmt(diff.get('forgetting'))} |"
            )
    if summary["alone"]:
        lines += [
            "",
            "Each task trained alone from the untouched model (test split, seed 0; acc@1 x100):",
            "",
        ]
        lines += ["| task | untouched | trained alone |", "|---|---|---|"]
        for row in summary["alone"]:
            lines.append(f"| {row['task']} | {100 * row['initial']:.1f} | {100 * row['trained']:.1f} |")
    if summary.get("missing_runs"):
        lines += ["", "Not finished (not in the tables): " + ", ".join(summary["missing_runs"])]
    for part in summary.get("partial_runs") or []:
        minutes = stream_seconds(part) / 60
        lines += [
            "",
            f"Unfinished run {part['run']}: {part['tasks_done']} task(s) of the stream done ({minutes:.0f} min so far); "
            "acc@1 x100, rows = after each finished task, columns = tasks in training order:",
            "",
            "| after \\ on | " + " | ".join(summary["tasks"]) + " |",
            "|---|" + "---|" * len(summary["tasks"]),
            "| (start) | " + " | ".join(f"{100 * v:.1f}" for v in part["initial"]) + " |",
        ]
        lines += [
            f"| {summary['tasks'][i]} | " + " | ".join(f"{100 * v:.1f}" for v in row) + " |"
            for i, row in enumerate(part["R"])
        ]
    note = summary.get("reduction_note")
    if note:
        lines += ["", note]
    atomic_write_text(path, "\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="el3", choices=list(CONFIGURATIONS), help="stream configuration")
    ap.add_argument("--recipe", default=None, help="default: the configuration's")
    ap.add_argument("--data-dir", default=None, help="corpora directory (default: the recipe's)")
    ap.add_argument("--out", default=None, help="default: the configuration's")
    ap.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=[*ORDER, "alone"],
        help="test-split methods to run ('alone': each task trained alone); default all",
    )
    ap.add_argument(
        "--chosen",
        action="append",
        default=[],
        metavar="METHOD.PARAM=VALUE",
        help="fix a searched setting instead of searching it on dev, e.g. kfac.continual_lambda=1e6",
    )
    ap.add_argument(
        "--start",
        default="minilm",
        choices=STARTS,
        help="start model; results go to OUT/<start> unless --out is given (default: minilm, straight into OUT)",
    )
    ap.add_argument("--aligned-model", default=None, help="the aligned encoder (for --start aligned[+state])")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override recipe values")
    ap.add_argument("--no-search", action="store_true", help="skip the dev search; use the first grid values")
    ap.add_argument("--progress", action="store_true", help="show Trainer progress bars")
    ap.add_argument(
        "--only-finished",
        action="store_true",
        help="start no run: aggregate the runs already on disk and list the missing ones",
    )
    ap.add_argument(
        "--replot",
        action="store_true",
        help="only redraw OUT/heatmap_<method>.png from OUT/summary.json (no run, no aggregation)",
    )
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    configuration = CONFIGURATIONS[args.config]
    default_out = Path(configuration["out"])
    out = Path(args.out) if args.out else default_out if args.start == "minilm" else default_out / args.start
    if args.replot:
        summary = json.loads((out / "summary.json").read_text())
        plot_method_heatmaps(out, summary.get("tasks") or summary["recipe"]["tasks"], summary["methods"])
        plot_search_curve(out, summary.get("search") or [])
        print(f"redrew {len(summary['methods'])} heatmaps (and the search curve) in {out}")
        return
    from hf_continual.metrics import forgetting_reduction
    from hf_continual.recipe import load_recipe
    from hf_continual.state import atomic_write_json
    from hf_continual.stream import task_labels

    overrides = (
        configuration["set"]
        + start_overrides(args.start, args.aligned_model)
        + list(args.set)
        + ([f"data_dir={args.data_dir}"] if args.data_dir else [])
    )
    recipe = load_recipe(args.recipe or configuration["recipe"], overrides=overrides)
    fixed = parse_chosen(args.chosen)
    wanted = set(args.methods or [*ORDER, "alone"])
    out.mkdir(parents=True, exist_ok=True)
    bench = Bench(recipe, out, args.progress, only_finished=args.only_finished)
    t_start = time.perf_counter()

    # ---- 1. search on dev ---------------------------------------------------------------------------------
    chosen: dict[str, dict[str, Any]] = {}
    search_rows: list[dict[str, Any]] = []
    search = search_grids(configuration)
    for method, (param, grid) in search.items():
        if method in fixed:
            chosen[method] = fixed[method]
            continue
        if not any(method in name for name in wanted):  # no wanted method needs this search
            continue
        if args.no_search:
            chosen[method] = {param: grid[0]}
            continue

        def dev_run(value: float, method: str = method, param: str = param) -> dict[str, Any] | None:
            overrides = {"continual_method": method, param: value}
            return bench.run("dev", f"{method}-{param}={value:g}", args.seeds[0], overrides)

        found = {value: dev_run(value) for value in grid}
        # values another process was running when we passed them may have finished while we ran ours
        if not args.only_finished:
            found.update({value: dev_run(value) for value, res in found.items() if res is None})
        best = choose_value(found)
        if best is not None:
            chosen[method] = {param: best}
        for value, res in found.items():
            if res is None:
                continue
            search_rows.append(
                {
                    "method": method,
                    "param": param,
                    "value": value,
                    "metrics": res["metrics"],
                    "plasticity": plasticity(res),
                    "kept": value == best,
                }
            )
    if not args.no_search and search_rows:
        ref = bench.run("dev", "none", args.seeds[0], {"continual_method": "none"})
        if ref is not None:
            search_rows.insert(
                0,
                {
                    "method": "none",
                    "param": "-",
                    "value": 0,
                    "metrics": ref["metrics"],
                    "plasticity": plasticity(ref),
                    "kept": True,
                },
            )

    # ---- 2. test runs ---------------------------------------------------------------------------------------
    methods: dict[str, Any] = {}
    method_runs: dict[str, list[dict[str, Any]]] = {}
    labels: list[str] | None = None  # the tasks in training order, with their entity types
    for name in ORDER:
        if name not in wanted:
            continue
        seeds = args.seeds if name in SEEDED else args.seeds[:1]
        needs = {"none"} if name in ("none", "replay", "joint") else {m for m in SEARCH if m in name}
        if name == "online_ewc":
            needs = {"ewc"}
        if not args.no_search and not needs <= set(chosen) | {"none"}:
            bench.missing[f"test/{name}"] = "its search is unfinished"
            continue
        runs = [r for s in seeds if (r := bench.run("test", name, s, method_overrides(name, chosen)))]
        # a method started at the first seed only: its runs at the other seeds of --seeds count where they were
        # run (e.g. ``--methods joint --seeds 1``); the table's seeds column says how many each mean is over
        runs += [
            r
            for s in args.seeds
            if s not in seeds
            if (r := bench.run("test", name, s, method_overrides(name, chosen), start=False))
        ]
        if not runs:
            continue
        seeds = [r["extra"]["bench"]["seed"] for r in runs]
        methods[name] = aggregate(runs)
        method_runs[name] = runs
        labels = task_labels(runs[0])  # training order, with each task's entity type

    # ---- 3. each task trained alone from the untouched model (test split, first seed) -----------------------
    alone = []
    for i, task_name in enumerate(recipe.tasks if "alone" in wanted else []):
        res = bench.run("test", f"alone-{task_name}", args.seeds[0], {"continual_method": "none"}, only=i)
        if res is None:
            continue
        alone.append(
            {"task": task_name, "initial": res["initial"][0], "trained": res["accuracy_matrix"][0][0]}
        )

    if methods:
        plot_method_heatmaps(out, labels, methods)
    plot_search_curve(out, search_rows)
    paired = {
        f"{a} - {b}": diff
        for a, b in PAIRED
        if a in method_runs and b in method_runs
        if (diff := paired_difference(method_runs[a], method_runs[b])) is not None
    }
    base_f = methods["none"]["forgetting"]["mean"] if "none" in methods else 0.0
    note = None
    for name, agg in methods.items():
        try:
            agg["forgetting_reduction"] = (
                forgetting_reduction(agg["forgetting"]["mean"], base_f) if name != "none" else None
            )
        except ValueError as err:
            agg["forgetting_reduction"] = None
            note = f"Forgetting reduction not reported: {err}."
    opts = recipe.task_options
    tr = recipe.training
    budget = (
        f"{recipe.name}: {opts.get('max_train_mentions') or 'all'} training mentions per task (deduplicated examples), "
        f"{tr.get('num_train_epochs')} epoch(s), lr {tr.get('learning_rate')}, batch {tr.get('per_device_train_batch_size')}, "
        f"{opts.get('max_eval_mentions')} evaluated mentions per task and split, candidate set "
        f"{opts.get('candidate_gold', 'all_splits')} + {opts.get('num_other_candidates', 20000)} sampled names"
    )
    if labels is None:  # no finished run yet: the recipe's order, entity types from the corpus declarations
        labels = task_labels({"tasks": recipe.tasks, "entity_types": entity_types_of(recipe)})
    summary = {
        "configuration": args.config,
        "budget": budget,
        "stream": " -> ".join(labels),
        "tasks": labels,
        "recipe": recipe.resolved(),
        "search_grid": {m: {"param": p, "values": g} for m, (p, g) in search.items()},
        "chosen": chosen,
        "fixed": fixed,  # given with --chosen, not searched here
        "search": search_rows,
        "methods": methods,
        "reduction_note": note,
        "paired": paired,
        "alone": alone,
        "missing_runs": [f"{run} ({why})" if why else run for run, why in bench.missing.items()],
        "partial_runs": bench.partial,
        "published_anchor": "on BERT, K-FAC cut forgetting by 51% and diagonal EWC by 27%",
        "wall_s_this_invocation": time.perf_counter() - t_start,
    }
    atomic_write_json(out / "summary.json", summary)
    write_markdown(summary, out / "summary.md")
    print((out / "summary.md").read_text())
    print(f"wrote {out / 'summary.json'} and {out / 'summary.md'}")


if __name__ == "__main__":
    main()
