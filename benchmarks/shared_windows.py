"""CPU time of the TinyCNN over overlapping windows: per window, and with shared work.

Times, on one thread, what :class:`util.night.shared_windows.SharedWindowRunner` does
for every batch of a night: the logits of ``--batch`` one-second windows every
``--hop_s`` seconds of two-channel noise (the front end's features, its own edge frames
included), run per window and with the first 1, 2 and 3 layers shared
(``SharedWindowRunner(..., depth=d)``), and the plan the runner chooses by itself
(:func:`util.night.shared_windows.plan_layers`). The runs take turns ``--repeats`` times;
each cell is the median thread CPU time, as a fraction of per window, next to what
:func:`~util.night.shared_windows.plan_cost` estimates (the runner chooses by the
estimate). Untrained weights: the convolutions cost the same trained or not.

    python benchmarks/shared_windows.py
    python benchmarks/shared_windows.py --hop_s 0.5 0.48 --repeats 31
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_HOPS = (0.5, 0.48, 0.4, 0.32, 0.25, 0.2, 0.16, 0.1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--hop_s", type=float, nargs="+", default=list(DEFAULT_HOPS), help="seconds between windows"
    )
    parser.add_argument("--batch", type=int, default=64, help="windows per batch (the demo's)")
    parser.add_argument("--repeats", type=int, default=15, help="timed turns of every run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the noise")
    args = parser.parse_args(argv)

    import torch

    from data.features import LogMelFrontEnd
    from models.classifier import Classifier
    from tests.helpers import build_like_cli
    from util.cpu import cpu_model
    from util.night.shared_windows import SharedWindowRunner, plan_cost

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    model = build_like_cli(
        Classifier, "models.backbones.TinyCNN", num_classes=3, class_names=["a", "b", "c"]
    ).eval()
    front_end = LogMelFrontEnd()
    print(
        f"shared windows benchmark: {cpu_model()}, 1 thread, batch {args.batch}, "
        f"median of {args.repeats}; each cell: measured / estimated, per window = 1"
    )
    print(
        "| hop (s) | per window (ms) | 1 layer shared | 2 layers | 3 layers | chosen plan | chosen |"
    )
    print("|---:|---:|---:|---:|---:|---|---:|")
    for hop_s in args.hop_s:
        hop = int(round(hop_s * front_end.sample_rate))
        hop_frames = hop // front_end.hop_length
        signal = torch.randn(2, (args.batch - 1) * hop + front_end.clip_samples) * 0.1
        with torch.inference_mode():
            windows = front_end.windows(signal, hop, args.batch).numpy()
        width = windows.shape[-1]
        runners = {d: SharedWindowRunner(model, hop_frames, depth=d) for d in (0, 1, 2, 3)}
        runners["auto"] = SharedWindowRunner(model, hop_frames)
        times: dict = {key: [] for key in runners}
        for _ in range(args.repeats):
            for key, runner in runners.items():
                t0 = time.thread_time()
                runner.logits(windows)
                times[key].append(time.thread_time() - t0)
        base = statistics.median(times[0])

        def cell(key, base=base, times=times, runners=runners, width=width) -> str:
            runner = runners[key]
            steps = runner.plan(width, 2, 2)
            estimate = plan_cost(steps, runner.weights) if steps[0].mode != "windows" else 1.0
            return f"{statistics.median(times[key]) / base:.3f} / {estimate:.3f}"

        chosen = "/".join(s.mode for s in runners["auto"].plan(width, 2, 2))
        print(
            f"| {hop_s:g} | {base / args.batch * 1e3:.3f} | {cell(1)} | {cell(2)} | {cell(3)} "
            f"| {chosen} | {cell('auto')} |"
        )
    print(
        "plan modes: stream (conv on the shared stream), phases (pooled in both phases, "
        "the rest per window), windows (per window from there on)"
    )


if __name__ == "__main__":
    main()
