"""The headline report: `results.json` -> markdown table and PNG plots (see benchmarks/headline.py)."""

from __future__ import annotations

from pathlib import Path

from plotting import pyplot

from cllm.hardware import OtherLoad


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
        "Speedup = the decoder's tokens/s over the fastest greedy AR of the same model: HF `generate` with its KV"
        " cache in each dtype, and where the profile has `compile_ar`, a static cache + `torch.compile`d step too.",
        *load_lines(results),
        *compiled_ar_lines(results),
        "",
        "| prompts | model | decoder | n | accepted tok/step | decoder tok/s | fastest AR tok/s (dtype) | speedup"
        " | = AR |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for set_name in sets:
        for model in ("base", "cllm"):
            speed_entry = results["models"][model][set_name]["speed"]
            fastest = fastest_ar(speed_entry)
            for decoder, n, timed in decoder_rows(speed_entry):
                lines.append(
                    f"| {set_name} | {model} | {decoder} | {n} | {timed['accepted_tokens_per_step']:.3f} | "
                    f"{timed['tokens_per_s']:.1f} ({timed['dtype']}) | "
                    f"{speed_entry['ar'][fastest]['tokens_per_s']:.1f} ({fastest}) | "
                    f"{timed['speedup_vs_fastest_ar']:.2f}x | {timed['ar_agreement']:.0%} |"
                )
    return "\n".join(lines) + "\n"


def fastest_ar(speed_entry: dict) -> str:
    """The baseline's name in `speed_entry["ar"]`: a dtype (eager) or "compiled DTYPE"; older reports: the dtype."""
    return speed_entry.get("fastest_ar", speed_entry["fastest_ar_dtype"])


SUSPECT_AGREEMENT = 0.5  # a compiled AR that equals eager AR on fewer prompts than this is broken, not rounded


def compiled_ar_lines(results: dict) -> list[str]:
    """Compiled AR's cost and agreement with eager AR, where it was timed."""
    lines = []
    for model, sets in results["models"].items():
        for set_name, entry in sets.items():
            for name, ar in entry.get("speed", {}).get("ar", {}).items():
                if "compile_s" in ar:
                    lines.append(
                        f"- {set_name}, {model}: {name} AR {ar['tokens_per_s']:.1f} tok/s after {ar['compile_s']:.0f} s"
                        f" of compilation; = eager AR of its dtype on {ar['eager_agreement']:.0%} of the prompts"
                    )
                    if ar["eager_agreement"] < SUSPECT_AGREEMENT:  # near-ties part a few outputs, never most
                        lines[-1] += "; **suspect: the compiled step computes something other than eager AR**"
            for name, error in entry.get("speed", {}).get("compile_failures", {}).items():
                lines.append(f"- {set_name}, {model}: {name} AR failed to compile ({error})")
    return ["", *lines] if lines else []


def other_loads(results: dict) -> list[float]:
    """The CPU share other processes used during each timed section (`cllm.hardware.OtherLoad`), where recorded."""
    entries = (entry["speed"] for model in results["models"].values() for entry in model.values() if "speed" in entry)
    return [share for entry in entries if (share := entry.get("other_cpu_share")) is not None]


def load_lines(results: dict) -> list[str]:
    shares = other_loads(results)
    if not shares:
        return []
    line = f"Other processes used {max(shares):.0%} of the CPU at most while a section was timed"
    repeats = next(iter(results["models"]["cllm"].values()))["speed"].get("repeats", 1)
    line += f"; each prompt's time is the fastest of {repeats} runs." if repeats > 1 else "."
    if max(shares) > OtherLoad.BUSY_SHARE:
        line += " **The machine was shared: these timings are not its speed** (rerun it alone)."
    return ["", line]


def decoder_rows(speed_entry: dict) -> list[tuple[str, str, dict]]:
    """(decoder, n, figures) for every timed decoder and n; reports from before `decoders` hold only `jacobi`."""
    decoders = speed_entry.get("decoders") or {"jacobi": speed_entry["jacobi"]}
    return [(decoder, n, timed) for decoder, by_n in decoders.items() for n, timed in by_n.items()]


def best_decoder(speed_entry: dict) -> tuple[str, str, dict]:
    """The (decoder, n, figures) with the highest tokens/s."""
    return max(decoder_rows(speed_entry), key=lambda row: row[2]["tokens_per_s"])


def summary(results: dict, output: Path) -> str:
    """The side-by-side printed at the end of a run: base vs trained, per set, with the report's paths."""
    settings = results["settings"]
    lines = [f"== {results['title']}", f"   {results['machine']}; total {results['timings'].get('total', 0):.0f} s"]
    for set_name in results["sets"]:
        base, cllm = (results["models"][m][set_name] for m in ("base", "cllm"))
        lines += [
            f"-- {set_name} ({cllm['num_prompts']} prompts, n={settings.get('n', 16)}):   base  ->  trained",
            f"   accepted tokens/step (Jacobi)   {base['accepted_tokens_per_step']:.3f} -> "
            f"{cllm['accepted_tokens_per_step']:.3f}",
        ]
        for key in cllm["quality"]:
            lines.append(f"   {key:<31} {base['quality'][key]:.3f} -> {cllm['quality'][key]:.3f}")
        lines.append(f"   {'degenerate rate':<31} {base['degenerate_rate']:.3f} -> {cllm['degenerate_rate']:.3f}")
        if "speed" in cllm:
            for label, entry in (("base", base), ("trained", cllm)):
                decoder, n, timed = best_decoder(entry["speed"])
                fastest = fastest_ar(entry["speed"])
                ar = entry["speed"]["ar"][fastest]["tokens_per_s"]
                lines.append(
                    f"   {label}: best decoder {decoder} (n={n}) {timed['tokens_per_s']:.1f} tok/s vs fastest AR "
                    f"{ar:.1f} tok/s ({fastest}): {timed['speedup_vs_fastest_ar']:.2f}x, "
                    f"{timed['accepted_tokens_per_step']:.2f} tokens/step, = AR {timed['ar_agreement']:.0%}"
                )
    shares = other_loads(results)
    if shares and max(shares) > OtherLoad.BUSY_SHARE:
        lines.append(f"   WARNING: other processes used up to {max(shares):.0%} of the CPU while timing: rerun alone")
    if results["validation_curve"]:
        curve = ", ".join(f"step {step} {value:.3f}" for step, value in results["validation_curve"])
        lines.append(f"   validation accepted tokens/step (held-out prompts, Jacobi): {curve}")
    lines += [f"   report: {output / 'results.md'}"]
    lines += [f"   plot:   {output / name}" for name in results.get("plots", [])]
    return "\n".join(lines)


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
        # the trained model's best decoder (highest tokens/s on the first set), for both models
        decoder, n, _ = best_decoder(results["models"]["cllm"][next(iter(sets))]["speed"])
        figure, axis = plt.subplots(figsize=(6, 4))
        for model in ("base", "cllm"):
            values = []
            for set_name in sets:
                speed_entry = results["models"][model][set_name]["speed"]
                by_decoder = speed_entry.get("decoders") or {"jacobi": speed_entry["jacobi"]}
                values += by_decoder[decoder][n]["per_prompt_speedup"]
            axis.plot(range(len(values)), values, "o", label=model)
        axis.axhline(1.0, color="gray", lw=0.8)
        axis.set(title=f"{decoder} speedup per prompt vs fastest greedy AR (n={n})", xlabel="prompt", ylabel="speedup")
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
