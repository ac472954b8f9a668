"""QLoRA merge written as a packed bitsandbytes NF4 checkpoint: tsllm, streamed, against PEFT's route.

ours: ``tsllm -q --store S lora merge BASE ADAPTER --base-quant nf4 --requantize nf4-packed
--max-memory M -o OUT``.
PEFT: ``from_pretrained(BASE, quantization_config=BitsAndBytesConfig(load_in_4bit, nf4, double
quant, compute bf16), device_map="cpu")`` -> ``PeftModel.from_pretrained(ADAPTER)`` ->
``merge_and_unload()`` (Linear4bit: dequantise, add the delta, quantise again) ->
``save_pretrained(OUT)``: the same output format from the same inputs.

Each side is a child process timed with ``os.wait4`` (wall, user + sys, peak RSS). The two
outputs are then compared tensor by tensor (same names; codes equal; weights dequantised by
``lora.nf4``: how many elements differ and by how much).

With ``--transformers-reference``, also the independent check: our in-memory dense QLoRA merge
quantised by transformers itself (``load_in_4bit`` then ``save_pretrained``) must equal our output
tensor for tensor.

Usage: python tests/benchmarks/bench_qlora_packed.py --base DIR --adapter DIR --work DIR [--max-memory 64M]
       [--skip-peft] [--transformers-reference]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

PEFT_SIDE = """
import sys, torch, transformers, peft
base, adapter, out = sys.argv[1:4]
config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                         bnb_4bit_compute_dtype=torch.bfloat16)
model = transformers.AutoModelForCausalLM.from_pretrained(base, quantization_config=config, device_map="cpu")
model = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
"""


TRANSFORMERS_SIDE = """
import sys, torch, transformers
from tensorstore_llm.lora.api import merge_adapter
base, adapter, dense, out = sys.argv[1:5]
merge_adapter(base, adapter, dense, base_quant="nf4")
config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                         bnb_4bit_compute_dtype=torch.bfloat16)
transformers.AutoModelForCausalLM.from_pretrained(dense, quantization_config=config, device_map="cpu").save_pretrained(out)
"""


def timed(cmd: list[str]) -> dict:
    """Run ``cmd``; wall seconds, user + sys seconds and peak RSS (MiB) from wait4."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code:
        raise SystemExit(f"{cmd[:4]} failed ({code}):\n{err[-2000:]}")
    return {"wall_s": round(time.perf_counter() - start, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024)}


def load_dir(path: str) -> dict:
    from safetensors.torch import load_file

    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out


def compare(ours_dir: str, peft_dir: str) -> dict:
    """Names, codes and dequantised weights of the two checkpoints."""
    import torch

    from tensorstore_llm.lora import nf4 as N

    ours, theirs = load_dir(ours_dir), load_dir(peft_dir)
    suffix = ".quant_state.bitsandbytes__nf4"
    packed = sorted(k[: -len(suffix)] for k in ours if k.endswith(suffix))
    report = {"same_names": set(ours) == set(theirs), "packed_weights": len(packed),
              "tensors_equal": sum(torch.equal(ours[k], theirs[k]) for k in ours if k in theirs),
              "tensors": len(ours), "weights_differing": 0, "elements_differing": 0, "elements": 0, "max_rel_diff": 0.0}
    report.update({"codes_differing": 0, "max_code_step": 0, "absmax_codes_differing": 0, "peft_state_dtypes": set()})
    for name in packed:
        codes = [torch.stack([p.reshape(-1) >> 4, p.reshape(-1) & 15], 1).reshape(-1).long() for p in (ours[name], theirs[name])]
        report["codes_differing"] += int((codes[0] != codes[1]).sum())
        report["max_code_step"] = max(report["max_code_step"], int((codes[0] - codes[1]).abs().max()))
        report["absmax_codes_differing"] += int((ours[name + ".absmax"] != theirs[name + ".absmax"]).sum())
        report["peft_state_dtypes"].add(N.from_bnb_state_dict(theirs, name).dtype)
        a = N.dequantize_nf4(N.from_bnb_state_dict(ours, name)).float()
        b = N.dequantize_nf4(N.from_bnb_state_dict(theirs, name)).float()
        differ = int((a != b).sum())
        report["elements"] += a.numel()
        report["elements_differing"] += differ
        report["weights_differing"] += bool(differ)
        if differ:
            report["max_rel_diff"] = max(report["max_rel_diff"], float((a - b).abs().max() / b.abs().max()))
    report["peft_state_dtypes"] = sorted(str(d) for d in report["peft_state_dtypes"])
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--work", required=True, help="scratch folder (emptied first)")
    ap.add_argument("--max-memory", default="64M")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--transformers-reference", action="store_true",
                    help="also quantise the dense QLoRA merge with transformers (load_in_4bit, save_pretrained) and "
                         "check our output equals it tensor for tensor")
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    store, ours, theirs = (os.path.join(args.work, n) for n in ("store", "ours", "peft"))
    load = os.getloadavg()
    result = {"load_before": [round(x, 1) for x in load]}
    result["ours"] = timed([sys.executable, "-m", "tensorstore_llm_cli", "-q", "--store", store, "lora", "merge",
                            args.base, args.adapter, "--base-quant", "nf4", "--requantize", "nf4-packed",
                            "--max-memory", args.max_memory, "-o", ours])
    if not args.skip_peft:
        result["peft"] = timed([sys.executable, "-c", PEFT_SIDE, args.base, args.adapter, theirs])
        result["ratio_wall"] = round(result["ours"]["wall_s"] / result["peft"]["wall_s"], 2)
        result["ratio_rss"] = round(result["ours"]["peak_rss_mib"] / result["peft"]["peak_rss_mib"], 2)
        result["compare"] = compare(ours, theirs)
    if args.transformers_reference:
        ref = os.path.join(args.work, "transformers")
        result["transformers"] = timed([sys.executable, "-c", TRANSFORMERS_SIDE, args.base, args.adapter,
                                        os.path.join(args.work, "dense"), ref])
        ours_t, ref_t = load_dir(ours), load_dir(ref)
        result["equals_transformers"] = set(ours_t) == set(ref_t) and all(
            ours_t[k].dtype == v.dtype and bool((ours_t[k] == v).all()) for k, v in ref_t.items())
    result["load_after"] = [round(x, 1) for x in os.getloadavg()]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
