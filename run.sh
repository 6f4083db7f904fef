#!/usr/bin/env bash
# The two commands of the README, on a fresh machine:
#   ./run.sh          set up, get CIFAR-10 if missing, run the main job (tta-bench sweep)
#   ./run.sh test     set up with the test extras, run the test suite
# Setup is idempotent: a stamp in the venv holds a hash of what was installed; when it
# matches, pip is skipped entirely. ./run.sh --help for the options.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage:
  ./run.sh [main] [TTA-BENCH OVERRIDES...]   set up, get CIFAR-10 if missing, run the main job
  ./run.sh test [PYTEST ARGS...]             set up with the test extras, run python -m pytest -q
  ./run.sh --help                            this text

Setup (both commands, idempotent): create the venv if missing, install
torch==2.14.1 torchvision==0.29.1 and this checkout (pip install -e ".[bench]"; for
`test`: ".[dev]" plus imagenet-c==0.0.3 --no-deps). A stamp in the venv holds a hash
of setup.cfg, pyproject.toml, the pins, the extras, the Python version and this
checkout's path; when it matches, pip is not run at all.

main: if $TTA_HOME/data/cifar10/test is missing, runs `tta-data cifar10` (torchvision
download, or --source $TTA_CIFAR10_SOURCE), then the README's main job:
  tta-bench -m hydra/launcher=joblib_local method=source,norm,tent,deyo \
    'data.corruptions=[gaussian_noise,shot_noise,impulse_noise,defocus_blur,contrast,brightness,pixelate,jpeg_compression]' \
    data.num_images=1000 hydra.sweep.dir=outputs/cifar10c_sev5
Overrides given after `main` are passed to tta-bench and replace the default of the
same key (e.g. ./run.sh main data.num_images=200 run.device=cuda). Finished jobs are
skipped on a rerun. At the end it prints where report.md, report.png and each job's
results.json are.

test: exits with pytest's status; "no tests collected" (pytest's 5) exits 1.

Environment:
  TTA_HOME             data and weights root (default ~/.cache/tta; for `test`, when
                       unset, ../shared next to the checkout if it exists, as
                       tests/conftest.py does). On this project's machines: TTA_HOME=../shared
  TTA_VENV             the venv (default .venv in the checkout)
  TTA_PYTHON           the Python that creates the venv (default python3; 3.10+)
  TTA_TORCH_INDEX_URL  pip --index-url for torch/torchvision only (e.g. a CPU or CUDA
                       build index of download.pytorch.org); default: pip's own
  TTA_CIFAR10_SOURCE   a local cifar-10-python.tar.gz or cifar-10-batches-py folder
                       for `tta-data cifar10 --source` (default: download)

Relative TTA_HOME / TTA_VENV / TTA_CIFAR10_SOURCE are taken from the directory you run
./run.sh in.
EOF
}

TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
TEST_NODEPS_PINS=(imagenet-c==0.0.3)
SWEEP_DIR_DEFAULT=outputs/cifar10c_sev5
MAIN_DEFAULTS=(
  hydra/launcher=joblib_local
  method=source,norm,tent,deyo
  'data.corruptions=[gaussian_noise,shot_noise,impulse_noise,defocus_blur,contrast,brightness,pixelate,jpeg_compression]'
  data.num_images=1000
  "hydra.sweep.dir=$SWEEP_DIR_DEFAULT"
)

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'run.sh: error: %s\n' "$*" >&2; exit 1; }
# An absolute path for a value given relative to the directory run.sh was started in.
abspath() {
  local p=$1
  case "$p" in "~"|"~/"*) p=$HOME${p#\~} ;; /*) ;; *) p=$PWD/$p ;; esac
  if command -v realpath >/dev/null 2>&1; then realpath -m -- "$p"; else printf '%s\n' "$p"; fi
}

cmd=main
case "${1:-}" in
  -h|--help|help) usage; exit 0 ;;
  main|test) cmd=$1; shift ;;
  "") ;;
  *=*|-*) ;;  # tta-bench overrides or options without `main`
  *) printf 'run.sh: unknown command %q\n\n' "$1" >&2; usage >&2; exit 2 ;;
esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ -n "${TTA_VENV:-}" ]; then VENV=$(abspath "$TTA_VENV"); else VENV=$ROOT/.venv; fi
if [ -n "${TTA_HOME+set}" ]; then
  [ -n "${TTA_HOME// /}" ] || die "TTA_HOME is set but empty: set it to the data and weights folder, or unset it"
  TTA_HOME=$(abspath "$TTA_HOME")
elif [ "$cmd" = test ] && [ -d "$ROOT/../shared" ]; then
  TTA_HOME=$(cd "$ROOT/../shared" && pwd)   # what tests/conftest.py would pick
else
  TTA_HOME=$HOME/.cache/tta
fi
export TTA_HOME
CIFAR10_SOURCE=
if [ -n "${TTA_CIFAR10_SOURCE:-}" ]; then CIFAR10_SOURCE=$(abspath "$TTA_CIFAR10_SOURCE"); fi
cd "$ROOT"

# ---------------------------------------------------------------- setup (idempotent)
setup() {  # $1: the extra of this checkout to install (bench | dev)
  local extra=$1 py=${TTA_PYTHON:-python3}
  if [ ! -x "$VENV/bin/python" ]; then
    command -v "$py" >/dev/null 2>&1 || die "$py not found: install Python 3.10+ (or set TTA_PYTHON)"
    "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
      || die "$py is $("$py" -V 2>&1): tta needs Python 3.10+ (set TTA_PYTHON)"
    say "creating the venv $VENV"
    "$py" -m venv "$VENV" \
      || die "could not create a venv with $py -m venv (on Debian/Ubuntu: apt-get install python3-venv)"
  fi
  local extra_pins=()
  if [ "$extra" = dev ]; then extra_pins=("${TEST_NODEPS_PINS[@]}"); fi
  local stamp=$VENV/.tta-run-sh-$extra.sha256 hash
  hash=$(
    {
      printf 'extra=%s\ntorch=%s\nindex=%s\nnodeps=%s\ncheckout=%s\n' \
        "$extra" "${TORCH_PINS[*]}" "${TTA_TORCH_INDEX_URL:-}" "${extra_pins[*]:-}" "$ROOT"
      "$VENV/bin/python" -V 2>&1
      cat setup.cfg pyproject.toml
    } | sha256sum | cut -d' ' -f1
  )
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$hash" ] && [ -x "$VENV/bin/tta-bench" ]; then
    say "venv $VENV is up to date (.[$extra]); pip skipped"
    return
  fi
  local pip=("$VENV/bin/python" -m pip)
  say "installing ${TORCH_PINS[*]} into $VENV (the first time: several minutes, GBs of wheels)"
  if [ -n "${TTA_TORCH_INDEX_URL:-}" ]; then
    "${pip[@]}" install "${TORCH_PINS[@]}" --index-url "$TTA_TORCH_INDEX_URL"
  else
    "${pip[@]}" install "${TORCH_PINS[@]}"
  fi
  say "installing this checkout: pip install -e \".[$extra]\""
  # The torch pins again, so that resolving the extras cannot move torch.
  "${pip[@]}" install -q -e ".[$extra]" "${TORCH_PINS[@]}"
  if [ "${#extra_pins[@]}" -gt 0 ]; then
    say "installing ${extra_pins[*]} --no-deps (the original ImageNet-C code the corruption tests compare with)"
    "${pip[@]}" install -q --no-deps "${extra_pins[@]}"
  fi
  printf '%s\n' "$hash" >"$stamp.tmp" && mv "$stamp.tmp" "$stamp"
  say "venv $VENV is ready (.[$extra])"
}

# CIFAR-10 in $TTA_HOME/data/cifar10/{train,test}, if its test split is missing.
get_cifar10() {
  if [ -d "$TTA_HOME/data/cifar10/test" ]; then
    say "CIFAR-10: $TTA_HOME/data/cifar10 (present)"
    return
  fi
  local args=(cifar10)
  if [ -n "$CIFAR10_SOURCE" ]; then args+=(--source "$CIFAR10_SOURCE"); fi
  say "CIFAR-10 missing at $TTA_HOME/data/cifar10/test: tta-data ${args[*]}"
  local rc=0
  tta-data "${args[@]}" || rc=$?
  if [ "$rc" -ne 0 ]; then
    say "tta-data failed (exit $rc). With a local copy: TTA_CIFAR10_SOURCE=/path/to/cifar-10-python.tar.gz $0 ...;"
    say "or point TTA_HOME at a folder that holds data/cifar10/{train,test}"
    exit "$rc"
  fi
}

# -------------------------------------------------------------------------- commands
run_main() {
  setup bench
  export PATH="$VENV/bin:$PATH" VIRTUAL_ENV="$VENV"
  get_cifar10
  # Defaults whose key the user overrides are left out (the user's value wins).
  local overrides=() d key a given sweep=$SWEEP_DIR_DEFAULT
  for d in "${MAIN_DEFAULTS[@]}"; do
    key=${d%%=*}
    given=0
    for a in "$@"; do
      a=${a#++}; a=${a#+}; a=${a#\~}
      if [ "${a%%=*}" = "$key" ]; then given=1; fi
    done
    if [ "$given" = 0 ]; then overrides+=("$d"); fi
  done
  for a in "$@"; do
    case "$a" in hydra.sweep.dir=*|+hydra.sweep.dir=*|++hydra.sweep.dir=*) sweep=${a#*=} ;; esac
  done
  say "TTA_HOME=$TTA_HOME tta-bench -m ${overrides[*]} $*"
  local start=$SECONDS rc=0
  tta-bench -m "${overrides[@]}" "$@" || rc=$?
  case "$sweep" in /*) ;; *) sweep=$ROOT/$sweep ;; esac
  if [ "$rc" -ne 0 ]; then
    say "tta-bench failed (exit $rc) after $((SECONDS - start)) s; job folders and logs: $sweep"
    exit "$rc"
  fi
  echo
  echo "Main job done in $((SECONDS - start)) s (TTA_HOME=$TTA_HOME). Results:"
  echo "  table: $sweep/report.md"
  echo "  plot:  $sweep/report.png"
  local found=0 f
  while IFS= read -r f; do
    echo "  job:   $f  (and results.csv, results.png beside it)"
    found=1
  done < <(find "$sweep" -mindepth 2 -maxdepth 3 -name results.json 2>/dev/null | sort)
  if [ "$found" = 0 ]; then echo "  jobs:  $sweep/*/results.json"; fi
  echo "  again: tta-bench-report $sweep"
}

run_test() {
  setup dev
  export PATH="$VENV/bin:$PATH" VIRTUAL_ENV="$VENV"
  get_cifar10
  say "TTA_HOME=$TTA_HOME python -m pytest -q $*"
  local rc=0
  python -m pytest -q "$@" || rc=$?
  echo
  if [ "$rc" -eq 5 ]; then
    echo "run.sh test: pytest collected no tests: failing (exit 1). TTA_HOME=$TTA_HOME" >&2
    exit 1
  fi
  echo "Tests done (exit $rc): pytest's summary is above. TTA_HOME=$TTA_HOME, venv $VENV."
  exit "$rc"
}

case "$cmd" in
  main) run_main "$@" ;;
  test) run_test "$@" ;;
esac
