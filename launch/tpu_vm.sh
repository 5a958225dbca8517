#!/usr/bin/env bash
# Runs the main job on a Cloud TPU VM (one host) or pod slice (several hosts):
# creates the VM, installs this repository on every worker, runs
# `python -m distill_jax.main ARGS...` on every worker at once, copies
# report.json and report.md back from worker 0, and deletes the VM (also when
# anything fails or the script is interrupted).
#
# Usage (from a machine with gcloud authenticated, in a clone of the repo):
#   PROJECT=my-project launch/tpu_vm.sh --config=configs/synthetic.py
#   PROJECT=my-project ACCELERATOR_TYPE=v4-16 GCS_BUCKET=my-bucket \
#     launch/tpu_vm.sh --config=configs/synthetic.py --config.teacher.batch_size=256
#
# The workers need no distributed settings: distill_jax/distributed.py finds
# the TPU and calls jax.distributed.initialize(), which reads the slice's
# layout from the TPU metadata server.
#
# Variables:
#   PROJECT           Google Cloud project (required)
#   ZONE              zone with capacity for ACCELERATOR_TYPE (default us-central2-b)
#   ACCELERATOR_TYPE  v4-8 (default; one host), v4-16 and up (pod slices), v5litepod-8, ...
#   RUNTIME_VERSION   TPU software version (default tpu-ubuntu2204-base;
#                     v5e wants v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e)
#   TPU_NAME          the VM's name (default distill-jax-$USER-<time>)
#   GCS_BUCKET        bucket mounted with gcsfuse on every worker to hold the workdir.
#                     Required for pod slices: every process must read the
#                     checkpoints and files the others write.
#   OUT_DIR           where report.json/report.md land here (default tpu_results/$TPU_NAME)
#   SPOT=1            create a spot VM (cheaper, may be pre-empted)
#   KEEP_VM=1         keep the VM at the end (for debugging; delete it yourself)
#
# What the VM runs is the repository's HEAD commit (`git archive`): commit
# first. Real data must be reachable from the workers (e.g. in GCS_BUCKET,
# mounted at /tmp/gcs: --config.data.path=/tmp/gcs/...).
set -euo pipefail

: "${PROJECT:?set PROJECT to your Google Cloud project}"
ZONE=${ZONE:-us-central2-b}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-8}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
TPU_NAME=${TPU_NAME:-distill-jax-${USER:-user}-$(date +%Y%m%d-%H%M%S)}
GCS_BUCKET=${GCS_BUCKET:-}
OUT_DIR=${OUT_DIR:-tpu_results/$TPU_NAME}
SPOT=${SPOT:-0}
KEEP_VM=${KEEP_VM:-0}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mount_point=/tmp/gcs
if [[ -n $GCS_BUCKET ]]; then
  workdir=$mount_point/$TPU_NAME
else
  workdir=/tmp/distill_jax_run
fi

tpu() {
  # --quiet: no prompts (delete's confirmation, ssh key generation).
  gcloud compute tpus tpu-vm "$@" --project="$PROJECT" --zone="$ZONE" --quiet
}

tmp=$(mktemp -d)
cleanup() {
  local status=$?
  rm -rf "$tmp"
  if [[ $KEEP_VM == 1 ]]; then
    echo "tpu_vm.sh: KEEP_VM=1: $TPU_NAME is still running; delete it with:" >&2
    echo "  gcloud compute tpus tpu-vm delete $TPU_NAME --project=$PROJECT --zone=$ZONE" >&2
  else
    echo "tpu_vm.sh: deleting $TPU_NAME" >&2
    # It may not exist (creation failed): that is not an error here.
    tpu delete "$TPU_NAME" || true
  fi
  exit "$status"
}
# Set before `create`: a half-created VM is billed too.
trap cleanup EXIT
trap 'exit 130' INT TERM

git -C "$repo" archive --format=tar.gz --prefix=distill_jax/ -o "$tmp/distill_jax.tar.gz" HEAD

create_flags=(--accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
# The VM's service account needs write access to the bucket.
create_flags+=(--scopes=https://www.googleapis.com/auth/cloud-platform)
if [[ $SPOT == 1 ]]; then create_flags+=(--spot); fi
echo "tpu_vm.sh: creating $TPU_NAME ($ACCELERATOR_TYPE, $RUNTIME_VERSION) in $ZONE" >&2
tpu create "$TPU_NAME" "${create_flags[@]}"

workers=$(tpu describe "$TPU_NAME" --format='value(networkEndpoints.len())')
echo "tpu_vm.sh: $TPU_NAME has ${workers:-?} worker(s)" >&2
if [[ $workers =~ ^[0-9]+$ ]] && ((workers > 1)) && [[ -z $GCS_BUCKET ]]; then
  echo "tpu_vm.sh: $ACCELERATOR_TYPE has $workers hosts: set GCS_BUCKET so that they" \
    "share the workdir (checkpoints, the teacher read by the students)" >&2
  exit 2
fi

# Same set-up on every worker. The package needs Python >= 3.11; the TPU
# images ship 3.10.
setup=$(
  cat <<EOF
set -euo pipefail
sudo apt-get -q update
sudo DEBIAN_FRONTEND=noninteractive apt-get -q install -y python3.11 python3.11-venv
rm -rf ~/distill_jax && tar -xzf ~/distill_jax.tar.gz -C ~
python3.11 -m venv ~/venv
~/venv/bin/pip install -q -U pip
~/venv/bin/pip install -q -e "\$HOME/distill_jax[tpu]"
EOF
)
if [[ -n $GCS_BUCKET ]]; then
  # gcsfuse from Google's apt repository. Metadata caching off: a process
  # must see at once the files another host has just written (result.json).
  # --rename-dir-limit: Orbax renames a checkpoint's temporary folder.
  setup+=$(
    cat <<EOF

echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list
curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
sudo apt-get -q update
sudo DEBIAN_FRONTEND=noninteractive apt-get -q install -y gcsfuse
mkdir -p $mount_point
gcsfuse --implicit-dirs --rename-dir-limit=1000000 --metadata-cache-ttl-secs=0 $GCS_BUCKET $mount_point
EOF
  )
fi

echo "tpu_vm.sh: installing on all workers" >&2
tpu scp "$tmp/distill_jax.tar.gz" "$TPU_NAME:" --worker=all
tpu ssh "$TPU_NAME" --worker=all --command="$setup"

# The same command on every worker, at once (jax.distributed waits for all).
args=""
if (($#)); then printf -v args ' %q' "$@"; fi
run="cd ~/distill_jax && ~/venv/bin/python -m distill_jax.main --workdir=$workdir$args"
echo "tpu_vm.sh: running on all workers: $run" >&2
tpu ssh "$TPU_NAME" --worker=all --command="$run"

mkdir -p "$OUT_DIR"
tpu scp "$TPU_NAME:$workdir/report.json" "$TPU_NAME:$workdir/report.md" "$OUT_DIR/" --worker=0
echo "tpu_vm.sh: report in $OUT_DIR" >&2
