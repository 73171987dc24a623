"""
What an evaluation reports, from its per-image records: every reward as mean +- standard error over prompts,
the paired difference of each model to the base, the toy world's GenEval-style breakdown, a Markdown table and
a comparison grid of images. eval.py writes them; any study that compares models against a base can reuse
them (scripts/ablations.py: the paired t-test's power and the learning curves over seeds).

A record is one image: {"row", "model", "prompt_index", "generation", "prompt", "scores": {name: float}}, plus
"category" on the toy world (where "scores" also holds the verifier's 0/1 `strict`).
"""

import torch
import torch.nn.functional as F

from plumbing import toy
from plumbing.runtime import image_grid, print0


def save_samples(traj, rewards, path, cols, scale):
    """A grid of the first 16 trajectories' images, captioned with reward and prompt."""
    captions = [f"{r:.2f} {p}" for r, p in zip(rewards[:16].tolist(), traj.prompts[:16], strict=True)]
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(traj.images[:16], captions, cols=cols, scale=scale).save(path)


def mean_se(values: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of (P, G) scores. The error is over the P per-prompt means (a prompt's G images
    are not independent draws), which is the usual image-level error when G = 1."""
    per_prompt = values.double().mean(1)  # (P,)
    se = per_prompt.std() / len(per_prompt) ** 0.5 if len(per_prompt) > 1 else torch.tensor(float("nan"))
    return values.double().mean().item(), se.item()


def geneval_breakdown(strict: torch.Tensor, categories: list[str]) -> dict[str, float]:
    """Strict accuracy (N,) per toy category, and `overall`, the mean over categories (GenEval's overall)."""
    acc = {}
    for c in toy.CATEGORIES:
        mask = torch.tensor([k == c for k in categories])  # (N,)
        if mask.any():
            acc[c] = strict[mask].float().mean().item()
    return acc | {"overall": sum(acc.values()) / len(acc)}


def summarize(records: list[dict], labels: list[str], names: list[str], P: int, G: int) -> list[dict]:
    """One summary per row, from every rank's records sorted by (row, prompt_index, generation):
    {label, mean, se, delta, delta_se: {name: float}[, geneval: {category: accuracy}]}.

    `delta` is the paired difference to row 0 (the base): same prompts and same noise, so its standard error
    is over per-prompt differences, which removes the prompts' own spread (the right error bar for "did
    training help").
    """
    by_row = [[r for r in records if r["row"] == m] for m in range(len(labels))]
    summaries = []
    for label, mine in zip(labels, by_row, strict=True):
        assert len(mine) == P * G, f"row {label!r} has {len(mine)} images, expected {P * G}"
        summary = {"label": label, "mean": {}, "se": {}, "delta": {}, "delta_se": {}}
        for name in names:
            values = torch.tensor([r["scores"][name] for r in mine]).view(P, G)
            base = torch.tensor([r["scores"][name] for r in by_row[0]]).view(P, G)
            summary["mean"][name], summary["se"][name] = mean_se(values)
            summary["delta"][name], summary["delta_se"][name] = mean_se(values - base)
        if "strict" in mine[0]["scores"]:
            strict = torch.tensor([r["scores"]["strict"] for r in mine])  # (P*G,)
            summary["geneval"] = geneval_breakdown(strict, [r["category"] for r in mine])
        summaries.append(summary)
    return summaries


def markdown(rows: list[dict], names: list[str], caption: str) -> str:
    """The results table (each reward: mean ± s.e., then the paired difference to the base) and, on the toy
    world, the breakdown by category."""
    head = [h for n in names for h in (n, f"Δ {n} vs base")]
    lines = [caption, "", "| model | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for i, r in enumerate(rows):
        cells = []
        for n in names:
            cells.append(f"{r['mean'][n]:.4f} ± {r['se'][n]:.4f}")
            cells.append(f"{r['delta'][n]:+.4f} ± {r['delta_se'][n]:.4f}" if i else "")
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    if "geneval" in rows[0]:
        cats = list(rows[0]["geneval"])
        lines += ["", "GenEval-style strict accuracy of the toy verifier by category:", ""]
        lines += ["| model | " + " | ".join(cats) + " |", "|---|" + "---|" * len(cats)]
        for r in rows:
            lines.append(f"| {r['label']} | " + " | ".join(f"{r['geneval'][c]:.3f}" for c in cats) + " |")
    return "\n".join(lines) + "\n"


def comparison_grid(tiles: dict, captions: dict, labels: list[str], num_prompts: int):
    """One column per model, one row per prompt, from uint8 tiles {(row, p): (3, H, W)} and captions
    {(row, p): str}, under a header naming the models. Tiles are shown 160 to 256 pixels high."""
    from PIL import Image, ImageDraw

    M = len(labels)
    keys = [(m, p) for p in range(num_prompts) for m in range(M)]
    images = torch.stack([tiles[key] for key in keys]).float() / 255  # (R*M, 3, H, W)
    h, w = images.shape[-2:]
    if h > 256:  # a FLUX grid of 1024 px tiles would be unwieldy
        images = F.interpolate(images, size=(256, 256 * w // h), mode="area")
    scale = max(1, 160 // images.shape[-2])
    body = image_grid(images, [captions[key] for key in keys], cols=M, scale=scale)
    column, header = body.width // M, 26
    chars = column // 6  # characters per line (the default font is ~6 px wide)
    grid = Image.new("RGB", (body.width, body.height + header), "white")
    grid.paste(body, (0, header))
    for m, label in enumerate(labels):  # the label's end, over two lines: run names and steps matter most
        text = label[-2 * chars :]
        two_lines = text[:chars] + "\n" + text[chars:]
        ImageDraw.Draw(grid).multiline_text((m * column + 2, 1), two_lines, fill="black", spacing=1)
    return grid


def plot_curve(path, mean, std, layouts: dict):
    """The mean L1rel curve (T,) with a +-1 std band, one panel per layout {name: chunk sizes}, each chunk
    boundary a dashed line. Skipped, with a message, when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print0("plot skipped: matplotlib is not installed (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(layouts), 1, figsize=(7, 1.8 * len(layouts)), sharex=True, squeeze=False)
    steps = torch.arange(len(mean)).numpy()
    for ax, (name, sizes) in zip(axes[:, 0], layouts.items(), strict=True):
        ax.plot(steps, mean.numpy(), "o-", ms=3)
        ax.fill_between(steps, (mean - std).numpy(), (mean + std).numpy(), alpha=0.25)
        for end in torch.tensor(sizes).cumsum(0)[:-1].tolist():  # the last step of each chunk but the last
            ax.axvline(end - 0.5, color="k", ls="--", lw=1)
        ax.set_ylabel("L1rel")
        ax.set_title(f"{name}: {sizes}", fontsize=9)
    axes[-1, 0].set_xlabel("step t (0 = highest noise)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print0(f"wrote {path}")


# ----------------------------------------------------------------------------- seeds: tests and their power
# Student's t quantiles for df 1-10 (0.975: a two-sided test at 5%; 0.8: 80% power), beyond them the
# Cornish-Fisher expansion z + (z^3 + z) / 4 df (under 1.2% off at df 11, closer after).
T_TABLE = {
    0.975: (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228),
    0.8: (1.376, 1.061, 0.978, 0.941, 0.920, 0.906, 0.896, 0.889, 0.883, 0.879),
}
Z = {0.975: 1.960, 0.8: 0.8416}


def t_quantile(q: float, df: int) -> float:
    if df <= len(T_TABLE[q]):
        return T_TABLE[q][df - 1]
    return Z[q] + (Z[q] ** 3 + Z[q]) / (4 * df)


def pooled_sd(samples: list[list[float]]) -> tuple[float, int]:
    """The SD pooled over samples that share one variance (each about its own mean), and its degrees of
    freedom."""
    samples = [torch.tensor(x, dtype=torch.float64) for x in samples if len(x) > 1]
    df = sum(len(x) - 1 for x in samples)
    squares = sum((((x - x.mean()) ** 2).sum().item() for x in samples), 0.0)
    return (squares / max(df, 1)) ** 0.5, df


def minimum_detectable(sd: float, n: int) -> float:
    """The smallest true mean difference that a paired two-sided t-test at 5% over n seeds detects with 80%
    power, when the per-seed differences have standard deviation `sd`: (t_0.975 + t_0.8) sd / sqrt(n), the
    normal-shift approximation (by simulation its power is 76% at 3 seeds, 79% at 5, 80% from 11 on)."""
    return (t_quantile(0.975, n - 1) + t_quantile(0.8, n - 1)) * sd / n**0.5


def seeds_needed(sd: float, difference: float) -> int:
    """The fewest seeds whose minimum detectable difference is at most `difference`."""
    return next(n for n in range(2, 10**6) if minimum_detectable(sd, n) <= difference)


def seed_power(differences: list[list[float]], target: float = 0.01) -> str:
    """The seeds' power, in a sentence: the SD of the per-seed differences of several comparisons (each a list
    over seeds), pooled; the seeds a true difference of `target` needs; and the smallest one the seeds run
    detect, both for a paired two-sided t-test at 5% with 80% power."""
    sd, df = pooled_sd(differences)
    if df == 0:
        return "Power: fewer than 2 seeds, no estimate."
    n = max(len(d) for d in differences)
    return (
        f"Power: the per-seed differences A - B have a pooled SD of {sd:.4f} ({df} degrees of freedom, "
        f"{len(differences)} comparisons). A paired two-sided t-test at 5% with 80% power needs "
        f"{seeds_needed(sd, target)} seeds to detect a true difference of {target:g}; with the {n} seeds "
        f"run, the minimum detectable difference is {minimum_detectable(sd, n):.3f} (an observed mean passes "
        f"the test once it exceeds {t_quantile(0.975, n - 1) * sd / n**0.5:.3f}).\n"
    )


def plot_seed_curves(path, configs: dict, names: list[str]):
    """Held-out (left) and training reward (right) against iteration, one line per configuration: the mean
    over its seeds with a +-1 std band. `configs` is {name: {"seeds": {seed: {"curve": {iteration: reward},
    "curve_base", "train": [reward per iteration]}}}}. Skipped, with a message, without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print0("figures skipped: matplotlib is not installed (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (held, train) = plt.subplots(1, 2, figsize=(12, 4.5))
    k = 5  # the training reward's running mean: one iteration's images are a noisy reading
    for i, name in enumerate(names):
        seeds = list(configs[name]["seeds"].values())
        colour, style = f"C{i % 10}", "-" if i < 10 else "--"
        its = sorted({int(it) for s in seeds for it in s["curve"]})
        its = [it for it in its if all(str(it) in s["curve"] for s in seeds)]
        y = torch.tensor([[0.0] + [s["curve"][str(it)] - s["curve_base"] for it in its] for s in seeds])
        t = torch.tensor([s["train"] for s in seeds])
        smooth = F.avg_pool1d(t[:, None], min(k, t.shape[1]), 1).squeeze(1)
        xs = (torch.arange(smooth.shape[1]) + min(k, t.shape[1])).tolist()
        for ax, x, v in ((held, [0, *its], y), (train, xs, smooth)):
            ax.plot(x, v.mean(0), style, color=colour, marker="o" if ax is held else None, ms=3, label=name)
            if len(seeds) > 1:
                ax.fill_between(x, v.mean(0) - v.std(0), v.mean(0) + v.std(0), color=colour, alpha=0.12)
    held.axhline(0, color="k", lw=0.8)
    held.set(xlabel="iteration", ylabel="held-out reward - base (first prompts, ODE)")
    train.set(xlabel="iteration", ylabel=f"training reward ({k}-iteration mean)")
    held.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print0(f"wrote {path}")
