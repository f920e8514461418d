# shellcheck shell=bash
# Shared by the moempi job scripts (sourced, not run): environment defaults, the moempi
# command line built from MOEMPI_* variables, and the world-size check.
#
# Knobs (environment; each script lists its own on top of these):
#   MOEMPI_VENV        virtual environment holding moempi (default: .venv next to jobs/,
#                      else whatever `moempi` is on PATH)
#   MOEMPI_BIN         the moempi command      (default: $MOEMPI_VENV/bin/moempi)
#   MOEMPI_PYTHON      python with mpi4py      (default: $MOEMPI_VENV/bin/python)
#   MOEMPI_CONFIG      run configuration TOML (optional; input/*.toml)
#   MOEMPI_MODEL       model file   (--model; required unless MOEMPI_CONFIG names it)
#   MOEMPI_TOKENS      tokens file  (--tokens; required unless MOEMPI_CONFIG names it)
#   MOEMPI_OUTPUT      output file; "{job}" becomes the Slurm job id (A_a for array tasks,
#                      "local" outside Slurm)   (default: moempi-{job}.h5)
#   MOEMPI_CHECKPOINT  checkpoint file for requeue-safe resume (--checkpoint); empty = none
#   MOEMPI_BATCH_TOKENS  tokens per rank per batch (pipeline.batch_tokens; the checkpoint step)
#   MOEMPI_MICRO_BATCHES micro-batches in flight (0 = choose from a probe)
#   MOEMPI_PRECISION   fp32 | bf16
#   MOEMPI_PLACEMENT   placement JSON (moempi place)
#   MOEMPI_BACKEND     numpy | cupy (backend.name)
#   MOEMPI_SET         more overrides, space separated: "balance.enabled=true pipeline.overlap=false"
#   MOEMPI_ARGS        more `moempi run` arguments, space separated
#   MOEMPI_OVERWRITE   1: replace an existing output (default 0: an existing output is an error)
#   MOEMPI_CHECK_WORLD 1: check the launcher's world size before the run (default 1)
#   MOEMPI_PROBE_TIMEOUT seconds allowed for that check (default 300)

MOEMPI_JOBS_DIR=${MOEMPI_JOBS_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
if [[ -z ${MOEMPI_VENV:-} && -x $MOEMPI_JOBS_DIR/../.venv/bin/moempi ]]; then
    MOEMPI_VENV=$(cd "$MOEMPI_JOBS_DIR/../.venv" && pwd)
fi
MOEMPI_VENV=${MOEMPI_VENV:-}
if [[ -n $MOEMPI_VENV ]]; then
    MOEMPI_BIN=${MOEMPI_BIN:-$MOEMPI_VENV/bin/moempi}
    MOEMPI_PYTHON=${MOEMPI_PYTHON:-$MOEMPI_VENV/bin/python}
else
    MOEMPI_BIN=${MOEMPI_BIN:-moempi}
    MOEMPI_PYTHON=${MOEMPI_PYTHON:-python3}
fi
MOEMPI_CONFIG=${MOEMPI_CONFIG:-}
MOEMPI_MODEL=${MOEMPI_MODEL:-}
MOEMPI_TOKENS=${MOEMPI_TOKENS:-}
MOEMPI_OUTPUT=${MOEMPI_OUTPUT:-"moempi-{job}.h5"}
MOEMPI_CHECKPOINT=${MOEMPI_CHECKPOINT:-}
MOEMPI_BATCH_TOKENS=${MOEMPI_BATCH_TOKENS:-}
MOEMPI_MICRO_BATCHES=${MOEMPI_MICRO_BATCHES:-}
MOEMPI_PRECISION=${MOEMPI_PRECISION:-}
MOEMPI_PLACEMENT=${MOEMPI_PLACEMENT:-}
MOEMPI_BACKEND=${MOEMPI_BACKEND:-}
MOEMPI_SET=${MOEMPI_SET:-}
MOEMPI_ARGS=${MOEMPI_ARGS:-}
MOEMPI_OVERWRITE=${MOEMPI_OVERWRITE:-0}
MOEMPI_CHECK_WORLD=${MOEMPI_CHECK_WORLD:-1}
MOEMPI_PROBE_TIMEOUT=${MOEMPI_PROBE_TIMEOUT:-300}

# The job id as `moempi run` spells "{job}": A_a for an array task, the job id, or "local".
if [[ -n ${SLURM_ARRAY_JOB_ID:-} && -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
    MOEMPI_JOB=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
else
    MOEMPI_JOB=${SLURM_JOB_ID:-local}
fi

moempi_die() {
    echo "moempi job: error: $*" >&2
    exit 1
}

# Print where and what the job is (goes to the job's log).
moempi_banner() {
    echo "moempi job ${MOEMPI_JOB} on $(hostname -s) at $(date -Is)"
    if [[ -n ${SLURM_JOB_ID:-} ]]; then
        echo "  slurm: ${SLURM_NTASKS:-?} task(s) on ${SLURM_JOB_NUM_NODES:-?} node(s)" \
             "[${SLURM_JOB_NODELIST:-?}], ${SLURM_CPUS_PER_TASK:-1} CPU(s)/task," \
             "restart ${SLURM_RESTART_COUNT:-0}"
    fi
    echo "  moempi: $MOEMPI_BIN (python $MOEMPI_PYTHON)"
    command -v "$MOEMPI_BIN" >/dev/null || moempi_die "moempi not found: $MOEMPI_BIN (set MOEMPI_VENV or MOEMPI_BIN)"
    if [[ -z $MOEMPI_CONFIG && ( -z $MOEMPI_MODEL || -z $MOEMPI_TOKENS ) ]]; then
        moempi_die "set MOEMPI_MODEL and MOEMPI_TOKENS (or MOEMPI_CONFIG naming them)"
    fi
}

# Threads per rank follow the CPUs Slurm gave each task (or 1).
moempi_threads() {
    local n=${SLURM_CPUS_PER_TASK:-1}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$n}
    export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-$n}
    export MKL_NUM_THREADS=${MKL_NUM_THREADS:-$n}
}

# moempi_check_world EXPECTED LAUNCHER...
# Start one tiny MPI program with the same launcher and check that it forms one world of
# EXPECTED ranks. srun without a PMI the MPI library speaks starts EXPECTED singletons
# (each its own world of 1) that would all compute the whole job: fail clearly instead.
moempi_check_world() {
    local expected=$1 out rc=0 lines sizes ranks
    shift
    [[ $MOEMPI_CHECK_WORLD == 1 ]] || { echo "world check: skipped (MOEMPI_CHECK_WORLD=$MOEMPI_CHECK_WORLD)"; return 0; }
    out=$(timeout "$MOEMPI_PROBE_TIMEOUT" "$@" "$MOEMPI_PYTHON" -c '
import os
from mpi4py import MPI
c = MPI.COMM_WORLD
me = (c.rank, c.size, MPI.Get_processor_name(), os.environ.get("CUDA_VISIBLE_DEVICES") or "-")
ranks = c.gather(me, root=0)
if c.rank == 0:  # one write per world: lines of different worlds never interleave
    os.write(1, "".join("moempi-world %d %d %s %s\n" % r for r in ranks).encode())
' 2>&1) || rc=$?
    if ((rc)); then
        echo "$out" >&2
        moempi_die "the world-size probe failed (exit $rc) under: $*"
    fi
    lines=$(grep -c '^moempi-world ' <<<"$out" || true)
    sizes=$(awk '$1 == "moempi-world" {print $3}' <<<"$out" | sort -un | paste -sd, -)
    ranks=$(awk '$1 == "moempi-world" {print $2}' <<<"$out" | sort -un | wc -l)
    if [[ $lines != "$expected" || $sizes != "$expected" || $ranks != "$expected" ]]; then
        echo "$out" >&2
        local hint=""
        if [[ $sizes == 1 && $lines -gt 1 ]]; then
            hint=" -- every process is its own MPI world of 1 (singletons): the launcher gave \
them no PMI the MPI library understands; with srun pick one it does (srun --mpi=list; \
MOEMPI_SRUN_MPI=pmi2 for MPICH, pmix for Open MPI) or use jobs/moempi-mpirun.sbatch"
        fi
        moempi_die "asked for $expected MPI ranks but the launcher started $lines process(es) \
reporting world size ${sizes:-none}$hint"
    fi
    echo "world check: $expected ranks on $(awk '$1 == "moempi-world" {print $4}' <<<"$out" | sort -u | paste -sd, -)" \
         "(GPUs per rank: $(sort -k2n <<<"$out" | awk '$1 == "moempi-world" {print $5}' | paste -sd' ' -))"
}

# The `moempi run` arguments from the MOEMPI_* knobs, into the array MOEMPI_RUN.
moempi_run_args() {
    MOEMPI_RUN=(run)
    [[ -n $MOEMPI_CONFIG ]] && MOEMPI_RUN+=("$MOEMPI_CONFIG")
    [[ -n $MOEMPI_MODEL ]] && MOEMPI_RUN+=(--model "$MOEMPI_MODEL")
    [[ -n $MOEMPI_TOKENS ]] && MOEMPI_RUN+=(--tokens "$MOEMPI_TOKENS")
    MOEMPI_RUN+=(--output "$MOEMPI_OUTPUT")
    [[ -n $MOEMPI_PLACEMENT ]] && MOEMPI_RUN+=(--placement "$MOEMPI_PLACEMENT")
    [[ -n $MOEMPI_PRECISION ]] && MOEMPI_RUN+=(--precision "$MOEMPI_PRECISION")
    [[ -n $MOEMPI_MICRO_BATCHES ]] && MOEMPI_RUN+=(--micro-batches "$MOEMPI_MICRO_BATCHES")
    if [[ -n $MOEMPI_CHECKPOINT ]]; then
        if "$MOEMPI_BIN" run --help 2>/dev/null | grep -q -- '--checkpoint'; then
            MOEMPI_RUN+=(--checkpoint "$MOEMPI_CHECKPOINT")
        else  # an older moempi: run, but say that a requeue starts from scratch
            echo "moempi job: warning: this moempi has no --checkpoint; running without one" \
                 "(a requeued job starts again from the first batch)" >&2
        fi
    fi
    [[ -n $MOEMPI_BATCH_TOKENS ]] && MOEMPI_RUN+=(--set "pipeline.batch_tokens=$MOEMPI_BATCH_TOKENS")
    [[ -n $MOEMPI_BACKEND ]] && MOEMPI_RUN+=(--set "backend.name=$MOEMPI_BACKEND")
    [[ $MOEMPI_OVERWRITE == 1 ]] && MOEMPI_RUN+=(--overwrite)
    local item
    for item in $MOEMPI_SET; do MOEMPI_RUN+=(--set "$item"); done
    # shellcheck disable=SC2206  # word splitting is the point
    MOEMPI_RUN+=($MOEMPI_ARGS)
    echo "moempi ${MOEMPI_RUN[*]}"
}
