"""Tables from benchmarks/results/diagnosis/{runs,seeds,decay}: python benchmarks/diagnosis/summarize.py > benchmarks/results/diagnosis/summary.md"""
import glob, json, os, statistics as st
from collections import defaultdict

R = "benchmarks/results/diagnosis"
print("## Mechanism ablations (seed 0), final epoch\n")
for task in ("cnn", "mlp50k", "mlp"):
    print(f"### {task}\n")
    print("| run | test | train (mean, eval) | train (sampled) | spread | sampled noise | decay/grad on mean | step RMS/lr (ep 1) | path/||W|| (ep 1-5) |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    for f in sorted(glob.glob(f"{R}/runs/{task}/*.json")):
        r = json.load(open(f)); e = r["final"]; ep = r["epochs"]
        path5 = sum(x["path_rel"] for x in ep[:5])
        print(f"| {os.path.basename(f)[:-5]} | {e['test_acc']:.1f} | {e['train_acc_mean']:.1f} | {e['train_acc_sampled']:.1f} | {e['spread']:.3f} | {e['sample_noise']:.3f} | {e['decay_over_grad'] or 0:.4f} | {ep[0]['step_rms_over_lr']:.4f} | {path5:.3f} |")
    print()


def seeds_tables(title, folder, tasks, norm=False):
    """One table per task: each method's runs over seeds (files <method>_s<seed>.json), mean ± std."""
    print(f"## {title}\n")
    for task in tasks:
        g = defaultdict(list)
        for f in glob.glob(f"{R}/{folder}/{task}/*.json"):
            g[os.path.basename(f).rsplit("_s", 1)[0]].append(json.load(open(f))["final"])
        extra = " ||mean|| |" if norm else ""
        print(f"### {task}\n\n| method | test | train (mean, eval) | train (sampled) | spread |{extra}\n|---|--:|--:|--:|--:|{'--:|' if norm else ''}")
        for m in sorted(g):
            v = g[m]
            ms = lambda k: f"{st.mean(x[k] for x in v):.1f} ± {st.stdev(x[k] for x in v):.1f}"
            row = f"| {m} (n={len(v)}) | {ms('test_acc')} | {ms('train_acc_mean')} | {ms('train_acc_sampled')} | {st.mean(x['spread'] for x in v):.3f} |"
            print(row + (f" {ms('mean_norm')} |" if norm else ""))
        print()


seeds_tables("Prototype, seeds 0-2 (mean ± std), final epoch", "seeds", ("cnn", "mlp50k"))
seeds_tables("Which decay helps the decoupled prototype (overfitting MLP, seeds 0-2, mean ± std), final epoch", "decay",
             ("mlp100", "mlp400"), norm=True)
