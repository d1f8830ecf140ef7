"""Reference-policy placement for the KL term (trainer/reference.py): what swapping the reference weights
in costs, against the reference forward pass it serves.

``python -m bench.reference``: a Qwen2-shaped model built locally (random weights; size by flags), one
forward-only pass over a batch (what the reference pass costs per step at this batch), and
``ReferencePolicy.swapped_in()`` with the weights on the device (pointer swap) and in host memory
(copied in). On a CPU machine "host" and "device" are the same memory, so "host" measures a memcpy of
the parameters; on a GPU it is the host-to-device transfer. Results: stdout and
bench/results/reference.json.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from bench.common import RESULTS as _RESULTS_DIR, machine, parse_args

RESULTS = _RESULTS_DIR / "reference.json"


def _timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None) -> dict:
    from megatron_a3po.models.tiny import build_tiny_hf_model, tiny_hf_config
    from megatron_a3po.trainer.reference import ReferencePolicy

    a = parse_args(argv, hidden=512, layers=4, vocab=32000, batch=4, seq=128, reps=3)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = tiny_hf_config("qwen2", vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.hidden * 11 // 4,
                         num_hidden_layers=a.layers, num_attention_heads=8, num_key_value_heads=2,
                         max_position_embeddings=max(32, a.seq))
    model = build_tiny_hf_model(cfg, seed=0).to(dev).eval()
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), device=dev)
    with torch.no_grad():
        model(ids)   # warm-up
        fwd = _timed(lambda: model(ids), a.reps)
    out = {"machine": machine(), "device": dev, "params": sum(p.numel() for p in model.parameters()),
           "tokens": a.batch * a.seq, "forward_s": statistics.median(fwd), "forward_all_s": fwd}
    for placement in ("device", "host"):
        ref = ReferencePolicy([model], placement)

        def swap(ref=ref):
            with ref.swapped_in():
                pass

        times = _timed(swap, a.reps)
        out[f"swap_{placement}_s"] = statistics.median(times)
        out[f"swap_{placement}_all_s"] = times
        out["ref_bytes"] = ref.nbytes
        del ref
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if not k.endswith("all_s")}, indent=2))
    return out


if __name__ == "__main__":
    main()
