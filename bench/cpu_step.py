"""What keeps a CPU training step fast beside other work: threads, the OpenMP wait policy, inter-op
threads; and whether bfloat16 autocast, torch.compile, a fused AdamW or the math attention backend
speeds it up on this CPU.

Times the tiny-vit training step of ``tbps-clip-cpu`` (batch 64 at 96x48, 48 tokens: image and text
forward, the symmetric contrastive loss, backward, AdamW) in a fresh process per setting, because
the OpenMP runtime reads ``OMP_WAIT_POLICY`` once, when torch loads it. Every setting runs on the
machine as it is (idle, on an idle machine) and beside a competing process that this bench starts
(one pure-Python busy loop: "other work" that wants one core), in rounds, interleaved, so that each
table row compares settings measured minutes apart at most. Prints the median step time of each
setting and its ratio to the first setting in the same condition.

    flock /work/wt/bench.lock env PYTHONPATH=src python bench/cpu_step.py --rounds 2 --steps 8

Run it under the bench lock: it measures what competition does, so unplanned competition spoils it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

# name -> (torch threads, inter-op threads or 0 for torch's default, OMP_WAIT_POLICY or None for unset,
#          variant: 0 as trained, 1 bfloat16 autocast, 2 no update of the 49,408 x 128 token embedding (what a
#          vocabulary of the training captions' few hundred words would save per step, at most), 3 both towers
#          through torch.compile (the first step, which compiles, is reported as first_s), 4 both 1 and 3,
#          5 AdamW fused (on a CPU torch's AdamW otherwise loops over the parameters one by one), 6 attention
#          through the math backend instead of CPU flash attention, 7 both 5 and 6)
SETTINGS = {
    "1 thread": (1, 0, None, 0),
    "2 threads": (2, 0, None, 0),
    "2 threads, PASSIVE": (2, 0, "PASSIVE", 0),
    "2 threads, ACTIVE": (2, 0, "ACTIVE", 0),
    "2 threads, 1 inter-op": (2, 1, None, 0),
    "1 thread, PASSIVE": (1, 0, "PASSIVE", 0),
    "1 thread, bf16 autocast": (1, 0, None, 1),
    "1 thread, token embedding frozen": (1, 0, None, 2),
    "2 threads, bf16 autocast": (2, 0, None, 1),
    "2 threads, torch.compile": (2, 0, None, 3),
    "2 threads, torch.compile + bf16": (2, 0, None, 4),
    "2 threads, fused AdamW": (2, 0, None, 5),
    "2 threads, math attention": (2, 0, None, 6),
    "2 threads, math attention + fused AdamW": (2, 0, None, 7),
}


def child(threads: int, interop: int, variant: int, steps: int, warmup: int) -> dict:
    """Time ``steps`` training steps after ``warmup`` (in this process)."""
    import torch
    import torch.nn.functional as F

    from tbps.engine.epoch import attention_kernel
    from tbps.engine.runtime import seed_everything
    from tbps.models.factory import create_model
    from tbps.recipes.config import load_recipe

    if interop:
        torch.set_num_interop_threads(interop)
    torch.set_num_threads(threads)
    seed_everything(0)
    model = create_model(load_recipe("tbps-clip-cpu").model, load_pretrained=False)
    if variant == 2:
        model.clip.token_embedding.weight.requires_grad_(False)
    encode_image, encode_text = model.encode_image, model.encode_text
    if variant in (3, 4):
        encode_image, encode_text = torch.compile(encode_image), torch.compile(encode_text)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True if variant in (5, 7) else None)
    # the trainer's train.attention context, fresh each step (sdpa_kernel's is single-use); the forward
    # picks the backend and its backward follows
    attention = functools.partial(attention_kernel, "math" if variant in (6, 7) else "auto")
    g = torch.Generator().manual_seed(1)
    images, tokens = torch.randn(64, 3, 96, 48, generator=g), torch.randint(1, 4000, (64, 48), generator=g)
    target = torch.arange(64)
    times, cpu = [], []
    for i in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant in (1, 4)), attention():
            img = F.normalize(encode_image(images).float(), dim=-1)  # (64, D)
            txt = F.normalize(encode_text(tokens).float(), dim=-1)  # (64, D)
        logits = 14.3 * img @ txt.t()
        loss = F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i == 0:
            first = time.perf_counter() - t0
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return {"median_s": statistics.median(times), "cpu_per_wall": sum(cpu) / sum(times), "first_s": first}


def measure(name: str, steps: int, warmup: int) -> dict:
    threads, interop, policy, variant = SETTINGS[name]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, __file__, "--child", str(threads), str(interop), str(variant), str(steps),
                          str(warmup)],
                         env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2, help="rounds over all settings and both conditions")
    p.add_argument("--steps", type=int, default=8, help="timed steps per setting")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--conditions", nargs="+", default=["as is", "+1 competitor"], choices=["as is", "+1 competitor"],
                   help="as is: whatever else the machine runs (idle only on an idle machine); "
                   "+1 competitor: plus a busy loop this bench starts")
    p.add_argument("--child", nargs=5, type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} UTC, load average {os.getloadavg()}, "
          f"cores {len(os.sched_getaffinity(0))}", flush=True)
    results: dict[tuple[str, str], list[dict]] = {}
    for r in range(args.rounds):
        for condition in args.conditions:
            burner = None
            if condition != "as is":
                burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                time.sleep(1.0)
            try:
                for name in args.settings:
                    m = measure(name, args.steps, args.warmup)
                    results.setdefault((name, condition), []).append(m)
                    print(f"round {r + 1} {condition:13s} {name:24s} {m['median_s']:.3f} s/step, "
                          f"first step {m['first_s']:.1f} s, cpu/wall {m['cpu_per_wall']:.2f}, "
                          f"load {os.getloadavg()[0]:.1f}", flush=True)
            finally:
                if burner is not None:
                    burner.kill()
                    burner.wait()
    first = args.settings[0]
    print(f"\nmedian over rounds; ratio = step time / '{first}' in the same condition")
    print("| setting | " + " | ".join(f"{c} s/step | ratio" for c in args.conditions) + " |")
    print("|---|" + "---|---|" * len(args.conditions))
    for name in args.settings:
        cells = []
        for c in args.conditions:
            t = statistics.median(m["median_s"] for m in results[(name, c)])
            cells.append(f"{t:.3f} | {t / statistics.median(m['median_s'] for m in results[(first, c)]):.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\nload average at the end {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
