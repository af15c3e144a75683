"""The headline benchmark: SmolLM2-135M, from nothing to a CLLM, base vs CLLM in one report.

    python benchmarks/headline.py                  # the full pipeline (<= 90 minutes on a 2-core CPU)
    python benchmarks/headline.py --quick          # a smoke-sized run (<= 10 minutes)
    python benchmarks/headline.py --suite json     # the narrow domain (json-extract), reported separately

Stages: (1+2) `python -m cllm fit --config smollm2-135m.yaml` collects stdlib-code trajectories (n=16) when the
trajectory folder is missing, then trains; (3) `python -m cllm export` turns the last checkpoint into a model
folder; (4) base and CLLM are evaluated in this process on held-out stdlib-code test prompts and HumanEval:
accepted tokens per Jacobi step, Jacobi vs greedy-AR tokens/s (batch 1, per prompt), HumanEval pass@1 (sandboxed
subprocess), exact match of CLLM vs base greedy output, degenerate-repetition rate; (5) JSON, markdown and PNG
plots in --output. Timings are wall-clock on whatever machine runs this; ratios are within one run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from cllm.bench import greedy_ar
from cllm.callbacks.accepted_tokens import common_prefix_fraction, has_repeated_run
from cllm.data_modules.json_extract import score_output
from cllm.data_modules.prompts import encode_prompts, load_prompts
from cllm.decoders import decode_batched
from cllm.errors import UserError
from cllm.evaluation import humaneval_pass_at_1, require_sandbox
from cllm.files import write_json
from cllm.jacobi import JacobiResult
from cllm.models import eos_ids, load_model
from cllm.records import REPETITION_LIMIT
from cllm.tracking import read_metrics_csv

# Two suites, never mixed: `broad` (held-out stdlib-code and HumanEval) and `json` (the narrow json-extract
# domain). Each has config overlays (after --config) and a quick and a full profile: quality_limit = prompts per
# set for acceptance and quality, speed_limit = prompts per set timed at batch 1; `fit` = overrides of the config.
SUITES = {
    "broad": {
        "sets": {"stdlib-code": "stdlib-code:test", "humaneval": "humaneval"},
        "overlays": [],
        "output": "headline",
        "title": "SmolLM2-135M-Instruct, broad code prompts",
        "quick": {
            "quality_limit": 12,
            "speed_limit": 2,
            "max_new_tokens": 48,
            "n_values": [16],
            "fit": [
                "--data.init_args.prompt_limit=12",
                "--data.init_args.max_new_tokens=48",
                "--data.init_args.val_prompt_limit=4",
                "--trainer.max_steps=8",
                "--trainer.val_check_interval=8",
                "--trainer.check_val_every_n_epoch=null",  # count val_check_interval in steps, across epochs
                "--trainer.callbacks.init_args.num_prompts=8",
                "--trainer.callbacks.init_args.max_new_tokens=48",
            ],
        },
        "full": {"quality_limit": 32, "speed_limit": 4, "max_new_tokens": 96, "n_values": [8, 16, 32], "fit": []},
    },
    "json": {
        "sets": {"json-extract": "json-extract:test"},
        "overlays": ["domains/json-extract.yaml"],
        "output": "narrow-json",
        "title": "SmolLM2-135M-Instruct, narrow domain: json-extract (structured output)",
        "quick": {
            "quality_limit": 16,
            "speed_limit": 2,
            "max_new_tokens": 64,
            "n_values": [16],
            "fit": [
                "--data.init_args.prompt_limit=16",
                "--data.init_args.val_prompt_limit=4",
                "--trainer.max_steps=8",
                "--trainer.val_check_interval=8",
                "--trainer.check_val_every_n_epoch=null",  # count val_check_interval in steps, across epochs
                "--trainer.callbacks.init_args.num_prompts=8",
            ],
        },
        "full": {
            "quality_limit": 48,
            "speed_limit": 6,
            "max_new_tokens": 64,
            "n_values": [8, 16, 32],
            "fit": [],  # the overlay's own sizes: 192 prompts, 120 steps, validation every 40
        },
    },
}


def run_stage(name: str, command: list[str], log: Path, timings: dict) -> None:
    print(f"== {name}: {' '.join(command)}  (log: {log})", flush=True)
    start = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, check=False)
    timings[name] = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"stage {name} failed (exit {done.returncode}); see {log}")


def latest_checkpoint(root: Path) -> Path:
    found = sorted(root.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        sys.exit(f"no checkpoint under {root}")
    return found[-1]


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    value = function(*args, **kwargs)
    return value, time.perf_counter() - start


def batched_jacobi(model, tokenizer, prompt_ids, max_new_tokens, n=16, batch_size=16) -> JacobiResult:
    """Outputs and acceptance on every quality prompt in one batched Jacobi run (not timed). Jacobi is lossless, so
    the outputs are the model's greedy outputs: the quality figures come from the same run."""
    kwargs = {
        "n": n,
        "max_new_tokens": max_new_tokens,
        "eos_token_id": eos_ids(model, tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
    }
    return decode_batched(model, prompt_ids, batch_size=batch_size, **kwargs)


def speed(models: dict, tokenizer, prompt_ids, max_new_tokens, n_values) -> dict:
    """Per prompt, batch 1: greedy AR in every dtype (the fastest is the baseline) and Jacobi for each n."""
    eos, pad = eos_ids(next(iter(models.values())), tokenizer), tokenizer.pad_token_id
    result = {"ar": {}, "jacobi": {}}
    for dtype, model in models.items():
        greedy_ar(model, prompt_ids[:1], max_new_tokens=4, eos=eos, pad_token_id=pad)  # warm-up
        runs = [
            timed(greedy_ar, model, [p], max_new_tokens=max_new_tokens, eos=eos, pad_token_id=pad) for p in prompt_ids
        ]
        tokens = [len(out[0]) for out, _ in runs]
        seconds = [s for _, s in runs]
        result["ar"][dtype] = {
            "tokens_per_s": sum(tokens) / sum(seconds),
            "per_prompt_tokens_per_s": [t / s for t, s in zip(tokens, seconds)],
            "outputs": [out[0] for out, _ in runs],
        }
    fastest = max(result["ar"], key=lambda d: result["ar"][d]["tokens_per_s"])
    jacobi_dtype = fastest  # Jacobi runs in the dtype where this machine's passes are cheapest
    model = models[jacobi_dtype]
    for n in n_values:
        kwargs = {"n": n, "max_new_tokens": max_new_tokens, "eos_token_id": eos, "pad_token_id": pad}
        decode_batched(model, prompt_ids[:1], batch_size=1, **{**kwargs, "max_new_tokens": 4})
        runs = [timed(decode_batched, model, [p], batch_size=1, **kwargs) for p in prompt_ids]
        tokens = [len(r.tokens[0]) for r, _ in runs]
        seconds = [s for _, s in runs]
        ar_per_prompt = result["ar"][fastest]["per_prompt_tokens_per_s"]
        per_prompt = [t / s for t, s in zip(tokens, seconds)]
        same_dtype_ar = result["ar"][jacobi_dtype]["outputs"]
        result["jacobi"][str(n)] = {
            "dtype": jacobi_dtype,
            "accepted_tokens_per_step": sum(r.accepted_tokens_per_step[0] for r, _ in runs) / len(runs),
            "per_prompt_accepted_tokens_per_step": [r.accepted_tokens_per_step[0] for r, _ in runs],
            "tokens_per_s": sum(tokens) / sum(seconds),
            "speedup_vs_fastest_ar": (sum(tokens) / sum(seconds)) / result["ar"][fastest]["tokens_per_s"],
            "per_prompt_speedup": [j / a for j, a in zip(per_prompt, ar_per_prompt)],
            "ar_agreement": sum(r.tokens[0] == a for (r, _), a in zip(runs, same_dtype_ar)) / len(runs),
        }
    result["fastest_ar_dtype"] = fastest
    for dtype in result["ar"]:
        result["ar"][dtype].pop("outputs")
    return result


def evaluate(spec: str, prompt_sets: dict, profile: dict, dtypes: list[str], unsafe_exec: bool = False) -> dict:
    models = {}
    for dtype in dtypes:
        models[dtype], tokenizer = load_model(spec, dtype=dtype)
    report = {}
    for name, prompts in prompt_sets.items():
        ids = encode_prompts(tokenizer, prompts)
        decoded = batched_jacobi(models[dtypes[0]], tokenizer, ids, profile["max_new_tokens"])
        outputs = decoded.tokens
        texts = [tokenizer.decode(o, skip_special_tokens=True) for o in outputs]
        entry = {
            "num_prompts": len(ids),
            "accepted_tokens_per_step": decoded.mean_accepted_tokens_per_step,
            "per_prompt_accepted_tokens_per_step": decoded.accepted_tokens_per_step,
            "degenerate_rate": sum(has_repeated_run(o, REPETITION_LIMIT) for o in outputs) / len(outputs),
            "outputs": outputs,
        }
        if profile["speed_limit"] > 0:
            entry["speed"] = speed(
                models, tokenizer, ids[: profile["speed_limit"]], profile["max_new_tokens"], profile["n_values"]
            )
        entry["quality"] = quality(name, prompts, texts, unsafe_exec)
        report[name] = entry
    return report


def quality(set_name: str, prompts: list, texts: list[str], unsafe_exec: bool = False) -> dict:
    """Task quality against the ground truth: HumanEval pass@1 (sandboxed execution); json-extract valid/exact/
    field accuracy against the generating record (nothing is executed). Other sets have none.
    `unsafe_exec`: run HumanEval code without the bubblewrap sandbox where there is none."""
    if set_name == "humaneval":
        passed = humaneval_pass_at_1([p.meta for p in prompts], texts, unsafe_exec=unsafe_exec)
        return {"pass_at_1": sum(passed) / len(passed)}
    if set_name == "json-extract":
        scores = [score_output(text, p.meta["record"]) for p, text in zip(prompts, texts)]
        return {key: sum(s[key] for s in scores) / len(scores) for key in ("valid", "exact", "fields")}
    return {}


def validation_curve(fit_root: Path) -> list[tuple[int, float]]:
    """(step, val/accepted_tokens_per_step) from the fit's CSV logs."""
    rows = read_metrics_csv(fit_root)
    key = "val/accepted_tokens_per_step"
    return sorted((int(row["step"]), row[key]) for row in rows if key in row)


def markdown(results: dict) -> str:
    settings, sets = results["settings"], results["sets"]
    lines = [
        f"# Headline benchmark: {results['title']}, base vs CLLM",
        "",
        f"Profile `{results['profile']}`; command: `{results['command']}`; machine: {results['machine']}.",
        f"Stage times (s): {', '.join(f'{k} {v:.0f}' for k, v in results['timings'].items())}.",
        "Accepted tokens per step = generated tokens / decode forward passes per sequence, averaged (AR = 1.0).",
        "",
        f"## Acceptance and quality (all evaluated prompts, n=16, max_new_tokens={settings['max_new_tokens']})",
        "",
        "| prompts | model | prompts | accepted tok/step | quality vs ground truth | degenerate | at max_new_tokens |"
        " = base output | common prefix with base |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for set_name in sets:
        for model in ("base", "cllm"):
            entry = results["models"][model][set_name]
            scores = ", ".join(f"{k} {v:.3f}" for k, v in entry["quality"].items()) or "-"
            lengths = entry["output_lengths"]
            at_limit = sum(length >= settings["max_new_tokens"] for length in lengths) / max(len(lengths), 1)
            lines.append(
                f"| {set_name} | {model} | {entry['num_prompts']} | {entry['accepted_tokens_per_step']:.3f} | "
                f"{scores} | {entry['degenerate_rate']:.3f} | {at_limit:.3f} | "
                f"{entry.get('exact_match_vs_base', 1.0):.3f} | {entry.get('common_prefix_vs_base', 1.0):.3f} |"
            )
    lines.append("")
    lines.append(
        "At max_new_tokens: share of outputs that ran into the length limit (unfinished code fails its tests)."
    )
    if not has_speed(results):
        return "\n".join(lines) + "\n"
    lines += [
        "",
        f"## Speed (batch 1, first {settings['speed_limit']} prompts of each set)",
        "",
        "Speedup = Jacobi tokens/s over the fastest greedy AR (HF `generate`, KV cache) of the same model.",
        "",
        "| prompts | model | n | accepted tok/step | Jacobi tok/s | fastest AR tok/s (dtype) | speedup | = AR |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for set_name in sets:
        for model in ("base", "cllm"):
            speed_entry = results["models"][model][set_name]["speed"]
            fastest = speed_entry["fastest_ar_dtype"]
            for n, jacobi in speed_entry["jacobi"].items():
                lines.append(
                    f"| {set_name} | {model} | {n} | {jacobi['accepted_tokens_per_step']:.3f} | "
                    f"{jacobi['tokens_per_s']:.1f} ({jacobi['dtype']}) | "
                    f"{speed_entry['ar'][fastest]['tokens_per_s']:.1f} ({fastest}) | "
                    f"{jacobi['speedup_vs_fastest_ar']:.2f}x | {jacobi['ar_agreement']:.0%} |"
                )
    return "\n".join(lines) + "\n"


def has_speed(results: dict) -> bool:
    return all("speed" in entry for model in results["models"].values() for entry in model.values())


def plots(results: dict, output: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots (pip install matplotlib)")
        return []
    made = []
    sets = results["sets"]
    figure, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 4), squeeze=False)
    for axis, set_name in zip(axes[0], sets):
        for model in ("base", "cllm"):
            values = results["models"][model][set_name]["per_prompt_accepted_tokens_per_step"]
            axis.hist(values, bins=12, alpha=0.6, label=f"{model} (mean {sum(values) / len(values):.3f})")
        axis.set(title=f"{set_name}: accepted tokens/step (n=16)", xlabel="tokens per step", ylabel="prompts")
        axis.legend()
    figure.tight_layout()
    figure.savefig(output / "accepted_tokens_hist.png", dpi=100)
    made.append("accepted_tokens_hist.png")
    if has_speed(results):
        first = results["models"]["base"][next(iter(sets))]["speed"]["jacobi"]
        n = "16" if "16" in first else next(iter(first))
        figure, axis = plt.subplots(figsize=(6, 4))
        for model in ("base", "cllm"):
            values = []
            for set_name in sets:
                values += results["models"][model][set_name]["speed"]["jacobi"][n]["per_prompt_speedup"]
            axis.plot(range(len(values)), values, "o", label=model)
        axis.axhline(1.0, color="gray", lw=0.8)
        axis.set(title=f"Jacobi speedup per prompt vs fastest greedy AR (n={n})", xlabel="prompt", ylabel="speedup")
        axis.legend()
        figure.tight_layout()
        figure.savefig(output / "speedup_per_prompt.png", dpi=100)
        made.append("speedup_per_prompt.png")
    if results["validation_curve"]:
        figure, axis = plt.subplots(figsize=(6, 4))
        steps, values = zip(*results["validation_curve"])
        axis.plot(steps, values, "o-")
        axis.set(title="val/accepted_tokens_per_step during training", xlabel="step", ylabel="tokens per step")
        figure.tight_layout()
        figure.savefig(output / "validation_curve.png", dpi=100)
        made.append("validation_curve.png")
    plt.close("all")
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke-sized run (<= 10 minutes)")
    parser.add_argument(
        "--suite", choices=sorted(SUITES), default="broad", help="broad: stdlib-code + HumanEval; json: narrow domain"
    )
    parser.add_argument("--config", default="smollm2-135m.yaml")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/headline"))
    parser.add_argument("--output", type=Path, default=None, help="default: docs/results/headline[-quick]")
    parser.add_argument("--skip-fit", action="store_true", help="reuse the model already exported in --work-dir")
    parser.add_argument(
        "--dtypes", nargs="+", default=["float32"], help="dtypes to time greedy AR in; the fastest is the baseline"
    )
    parser.add_argument(
        "--speed-limit",
        type=int,
        default=None,
        help="prompts per set timed at batch 1 (default: the profile's; 0: no timing)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="re-render results.md and the plots from --output's results.json",
    )
    parser.add_argument(
        "--unsafe-exec",
        action="store_true",
        help="run model-written HumanEval code even without the bubblewrap sandbox (only on a throwaway machine)",
    )
    parser.add_argument("fit_args", nargs="*", help="extra overrides passed to `cllm fit` (after --)")
    args = parser.parse_args()
    name = "quick" if args.quick else "full"
    suite = SUITES[args.suite]
    profile, sets = suite[name], suite["sets"]
    if args.speed_limit is not None:
        profile = {**profile, "speed_limit": args.speed_limit}
    output = args.output or Path("docs/results") / (suite["output"] + ("-quick" if args.quick else ""))
    if args.report_only:
        results = json.loads((output / "results.json").read_text())
        results["plots"] = plots(results, output)
        write_json(output / "results.json", results)
        (output / "results.md").write_text(markdown(results))
        print(f"re-rendered {output}/results.md and {len(results['plots'])} plots")
        return
    if "humaneval" in sets:
        try:  # before hours of training, not after
            require_sandbox(args.unsafe_exec)
        except UserError as err:
            print(f"headline: error: {err}", file=sys.stderr)
            sys.exit(2)
    work = args.work_dir / f"{args.suite}-{name}"
    work.mkdir(parents=True, exist_ok=True)
    output.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    exported = work / "cllm-model"
    python = [sys.executable, "-m", "cllm"]
    if not args.skip_fit:
        fit = [
            *python,
            "fit",
            "--config",
            args.config,
            *(f"--config={overlay}" for overlay in suite["overlays"]),
            f"--trainer.default_root_dir={work / 'fit'}",
            f"--trainer.logger.init_args.save_dir={work / 'fit'}",
            f"--data.init_args.path={work / 'trajectories'}",
            *profile["fit"],
            *args.fit_args,
        ]
        run_stage("collect+fit", fit, work / "fit.log", timings)
        export = [*python, "export", "--ckpt", str(latest_checkpoint(work / "fit")), "--output", str(exported)]
        run_stage("export", export, work / "export.log", timings)

    start = time.perf_counter()
    prompt_sets = {key: load_prompts(source, limit=profile["quality_limit"]) for key, source in sets.items()}
    results = {
        "title": suite["title"],
        "suite": args.suite,
        "sets": sets,
        "profile": name,
        "command": " ".join(["python benchmarks/headline.py", *sys.argv[1:]]),
        "machine": f"{torch.get_num_threads()} torch threads, {sys.platform}",
        "settings": {k: v for k, v in profile.items() if k != "fit"}
        | {"config": [args.config, *suite["overlays"]], "fit_overrides": profile["fit"] + args.fit_args},
        "timings": timings,
        "models": {
            "base": evaluate("smollm2-135m", prompt_sets, profile, args.dtypes, args.unsafe_exec),
            "cllm": evaluate(str(exported), prompt_sets, profile, args.dtypes, args.unsafe_exec),
        },
        "validation_curve": validation_curve(work / "fit"),
    }
    for set_name in sets:
        base, cllm = results["models"]["base"][set_name], results["models"]["cllm"][set_name]
        pairs = list(zip(cllm["outputs"], base["outputs"]))
        cllm["exact_match_vs_base"] = sum(a == b for a, b in pairs) / len(pairs)
        cllm["common_prefix_vs_base"] = sum(common_prefix_fraction(a, b) for a, b in pairs) / len(pairs)
    timings["evaluate"] = time.perf_counter() - start
    for model in results["models"].values():  # token lists are bulky; keep them out of the report JSON
        for entry in model.values():
            entry["output_lengths"] = [len(o) for o in entry.pop("outputs")]
    write_json(output / "results.json", results)  # first, so a plotting failure loses no measurement
    results["plots"] = plots(results, output)
    write_json(output / "results.json", results)
    (output / "results.md").write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {output}/results.json, results.md and {len(results['plots'])} plots")


if __name__ == "__main__":
    main()
