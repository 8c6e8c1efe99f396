#!/usr/bin/env bash
# GPU smoke run (issue 20): the `gpu` test tier + relevance / CoOp step timings on CUDA, in one call (< 8 min).
#
#   here, once before the device call:   bash benchmarks/gpu_smoke.sh --prepare
#       copies the pure-Python packages the device image lacks (open_clip, ftfy, wcwidth) from this venv into
#       .gpu_deps/ (git-ignored through .git/info/exclude), since the device machine reaches no package registry;
#   on the device (tool `run`):          bash benchmarks/gpu_smoke.sh            carry: [".gpu_deps"], timeout_s 540
#   anywhere:                            bash benchmarks/gpu_smoke.sh OUT_DIR    (default $OUT, else outputs/gpu_smoke)
#
# Writes to OUT_DIR (<= 8 files, the device tool's limit): summary.md, summary.json (GPU name, versions, pass/fail
# counts, tier time, step times, peak memory), gpu_tier.log, gpu_tier.xml, steps.json, relevance.log, coop_step.log.
# Every stage has its own timeout, so the whole run ends within ~8 minutes even when a stage hangs.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEPS="$ROOT/.gpu_deps"

if [[ "${1:-}" == "--prepare" ]]; then
  PY_HERE=${PYTHON:-$ROOT/.venv/bin/python}
  [[ -x "$PY_HERE" ]] || PY_HERE=python3
  SITE=$("$PY_HERE" -c "import open_clip, os; print(os.path.dirname(os.path.dirname(open_clip.__file__)))") || {
    echo "open_clip is not importable with $PY_HERE: set PYTHON=/path/to/venv/bin/python"; exit 1; }
  rm -rf "$DEPS" && mkdir -p "$DEPS"
  for pkg in open_clip ftfy wcwidth; do
    cp -r "$SITE/$pkg" "$DEPS/" || exit 1
    cp -r "$SITE"/${pkg}*.dist-info "$DEPS/" 2>/dev/null || true
  done
  cp -r "$SITE"/open_clip_torch-*.dist-info "$DEPS/" 2>/dev/null || true
  find "$DEPS" -name __pycache__ -type d -prune -exec rm -rf {} +
  EXCLUDE="$(git -C "$ROOT" rev-parse --git-common-dir)/info/exclude"
  mkdir -p "$(dirname "$EXCLUDE")"
  grep -qxF "/.gpu_deps/" "$EXCLUDE" 2>/dev/null || echo "/.gpu_deps/" >> "$EXCLUDE"
  echo "prepared $DEPS ($(du -sh "$DEPS" | cut -f1)); run on the device with carry [\".gpu_deps\"]"
  exit 0
fi

OUTDIR=${1:-${OUT:-$ROOT/outputs/gpu_smoke}}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
T0=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline \
       TOKENIZERS_PARALLELISM=false WANDB_DIR=/tmp/xclip_wandb MPLBACKEND=Agg
mkdir -p /tmp/xclip_wandb

# ---- environment: the package is the repository root, imported as `xclip` ---------------------------------------
mkdir -p /tmp/xclip_pk && ln -sfn "$ROOT" /tmp/xclip_pk/xclip
export PYTHONPATH="/tmp/xclip_pk${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import open_clip" 2>/dev/null; then
  if [[ -d "$DEPS" ]]; then
    export PYTHONPATH="$PYTHONPATH:$DEPS"
  else  # a machine with a registry: the pinned requirements (minutes; not possible on the offline device)
    timeout 240 "$PY" -m pip install -q --retries 0 --timeout 10 -r "$ROOT/requirements.txt" \
      && timeout 60 "$PY" -m pip install -q --no-deps --no-build-isolation -e "$ROOT" \
      || echo "WARNING: could not install requirements; run 'bash benchmarks/gpu_smoke.sh --prepare' here first"
  fi
fi
cd "$ROOT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > /tmp/xclip_gpu.txt 2>&1 \
  || echo "nvidia-smi failed" > /tmp/xclip_gpu.txt
"$PY" - <<'EOF' > /tmp/xclip_versions.txt 2>&1
import torch, pytorch_lightning, open_clip
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), lightning {pytorch_lightning.__version__}, "
      f"open_clip {open_clip.__version__}, cuda available {torch.cuda.is_available()}")
EOF

# ---- 1. the gpu tier -------------------------------------------------------------------------------------------
T1=$(date +%s)
timeout 300 "$PY" -m pytest -q -m gpu tests/test_gpu.py -rA --durations=0 -p no:cacheprovider \
  --junitxml="$OUTDIR/gpu_tier.xml" > "$OUTDIR/gpu_tier.log" 2>&1
TIER_RC=$?
TIER_S=$(( $(date +%s) - T1 ))

# ---- 2. CUDA step timings (CUDA events, after warm-up) and peak memory --------------------------------------------
timeout 150 "$PY" - "$OUTDIR/steps.json" <<'EOF' > "$OUTDIR/steps.log" 2>&1
import json, sys, time
import torch
from xclip.lightning_modules.coop import CoOp
from xclip.models.clip_backbone import build_clip
from xclip.models.relevance import image_relevance, text_relevance

assert torch.cuda.is_available(), "no CUDA"
dev = "cuda"
res = {}

def timed(fn, reps=5, warmup=2):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record(); torch.cuda.synchronize()
    return start.elapsed_time(end) / reps, torch.cuda.max_memory_allocated() / 2 ** 20

torch.manual_seed(0)
bb = build_clip("ViT-B-32", None).freeze().to(dev)  # random weights, ViT-B/32 shapes
images = torch.randn(8, 3, 224, 224, device=dev)
tokens = bb.tokenize([f"a photo of a thing number {i}" for i in range(100)])
for prec, dtype in (("fp32", None), ("bf16-mixed", torch.bfloat16)):
    ctx = (lambda: torch.autocast("cuda", dtype=dtype)) if dtype else (lambda: torch.autocast("cuda", enabled=False))
    def text():
        with ctx():
            text_relevance(bb, images, tokens)
    def image():
        with ctx():
            image_relevance(bb, images, tokens[:16])
    ms, mb = timed(text)
    res[f"text_relevance_8x100_{prec}"] = {"ms": ms, "peak_mib": mb}
    ms, mb = timed(image)
    res[f"image_relevance_8x16_{prec}"] = {"ms": ms, "peak_mib": mb}

names = [f"thing {i}" for i in range(100)]
for label, ew in (("coop", 0.0), ("coop_ntlb", 1.0)):
    torch.manual_seed(0)
    m = CoOp("ViT-B-32", None, classnames=names, n_ctx=16, class_token_position="middle", expl_weight=ew).to(dev)
    x, y = torch.randn(8, 3, 224, 224, device=dev), torch.randint(0, 100, (8,), device=dev)
    for prec, dtype in (("fp32", None), ("16-mixed", torch.float16), ("bf16-mixed", torch.bfloat16)):
        def step():
            with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
                out = m.compute_losses(x, y)
            m.prompt_learner.ctx.grad = None
            out["loss"].backward()
        ms, mb = timed(step, reps=3, warmup=1)
        res[f"{label}_step_100cls_b8_{prec}"] = {"ms": ms, "peak_mib": mb}
    del m
    torch.cuda.empty_cache()
for k, v in res.items():
    print(f"{k:40s} {v['ms']:9.1f} ms  peak {v['peak_mib']:8.0f} MiB")
json.dump(res, open(sys.argv[1], "w"), indent=2)
EOF
STEPS_RC=$?
cat "$OUTDIR/steps.log" >> "$OUTDIR/gpu_tier.log"
rm -f "$OUTDIR/steps.log"

# ---- 3. the project's own benchmarks, small settings (flags detected from --help) --------------------------------
bench() {  # bench NAME SMALL_ARGS...
  local name=$1; shift
  local help args=()
  help=$(timeout 60 "$PY" "benchmarks/$name.py" --help 2>&1)
  [[ "$help" == *"--device"* ]] && args+=(--device cuda)
  if [[ "$help" == *"--quick"* ]]; then args+=(--quick); else args+=("$@"); fi
  echo "$ $PY benchmarks/$name.py ${args[*]}" > "$OUTDIR/$name.log"
  timeout 90 "$PY" "benchmarks/$name.py" "${args[@]}" >> "$OUTDIR/$name.log" 2>&1
  echo "exit $?" >> "$OUTDIR/$name.log"
}
bench relevance --images 2 --texts 10 --pairs 1
bench coop_step --classes 10 --batch 2 --anchor_images 1

# ---- summary ---------------------------------------------------------------------------------------------------
TOTAL_S=$(( $(date +%s) - T0 ))
"$PY" - "$OUTDIR" "$TIER_RC" "$TIER_S" "$STEPS_RC" "$TOTAL_S" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
out, tier_rc, tier_s, steps_rc, total_s = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
s = {"gpu": Path("/tmp/xclip_gpu.txt").read_text().strip(), "versions": Path("/tmp/xclip_versions.txt").read_text().strip(),
     "tier_exit": tier_rc, "tier_seconds": tier_s, "steps_exit": steps_rc, "total_seconds": total_s}
try:
    root = ET.parse(out / "gpu_tier.xml").getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    n["passed"] = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    s["tests"] = n
    s["failed"] = [f"{c.get('name')}: {(c.find('failure') if c.find('failure') is not None else c.find('error')).get('message', '')[:300]}"
                   for c in suite.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
except (OSError, ET.ParseError, AttributeError) as e:
    s["tests"] = f"no junit xml ({e})"
try:
    s["steps"] = json.loads((out / "steps.json").read_text())
except (OSError, ValueError):
    s["steps"] = "steps benchmark failed (see gpu_tier.log)"
(out / "summary.json").write_text(json.dumps(s, indent=2))
lines = [f"# GPU smoke run", "", f"- GPU: {s['gpu']}", f"- {s['versions']}",
         f"- gpu tier: {s['tests']} in {tier_s} s (pytest exit {tier_rc})", f"- total: {total_s} s", ""]
for f in s.get("failed", []):
    lines.append(f"  - FAILED {f}")
if isinstance(s["steps"], dict):
    lines += ["| step | ms | peak MiB |", "| --- | ---: | ---: |"]
    lines += [f"| {k} | {v['ms']:.1f} | {v['peak_mib']:.0f} |" for k, v in s["steps"].items()]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
exit $TIER_RC
