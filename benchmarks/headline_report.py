"""The headline report: `results.json` -> markdown table and PNG plots (see benchmarks/headline.py)."""

from __future__ import annotations

from pathlib import Path

from plotting import pyplot


def markdown(results: dict) -> str:
    settings, sets = results["settings"], results["sets"]
    lines = [
        f"# Headline benchmark: {results['title']}, base vs CLLM",
        "",
        f"Profile `{results['profile']}`; command: `{results['command']}`; machine: {results['machine']}.",
        f"Stage times (s): {', '.join(f'{k} {v:.0f}' for k, v in results['timings'].items())}.",
        "Accepted tokens per step = generated tokens / decode forward passes per sequence, averaged (AR = 1.0).",
        "",
        f"## Acceptance and quality (all evaluated prompts, n={settings.get('n', 16)}, "
        f"max_new_tokens={settings['max_new_tokens']})",
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
    plt = pyplot()
    if plt is None:
        return []
    made = []
    sets = results["sets"]
    figure, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 4), squeeze=False)
    for axis, set_name in zip(axes[0], sets):
        for model in ("base", "cllm"):
            values = results["models"][model][set_name]["per_prompt_accepted_tokens_per_step"]
            axis.hist(values, bins=12, alpha=0.6, label=f"{model} (mean {sum(values) / len(values):.3f})")
        n = results["settings"].get("n", 16)
        axis.set(title=f"{set_name}: accepted tokens/step (n={n})", xlabel="tokens per step", ylabel="prompts")
        axis.legend()
    figure.tight_layout()
    figure.savefig(output / "accepted_tokens_hist.png", dpi=100)
    made.append("accepted_tokens_hist.png")
    if has_speed(results):
        first = results["models"]["base"][next(iter(sets))]["speed"]["jacobi"]
        trained = str(results["settings"].get("n", 16))
        n = trained if trained in first else next(iter(first))
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
