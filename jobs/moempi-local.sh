#!/usr/bin/env bash
# moempi on a workstation (no Slurm): mpiexec -n MOEMPI_NP on this machine.
#
#   MOEMPI_MODEL=model.h5 MOEMPI_TOKENS=tokens.h5 jobs/moempi-local.sh
#   MOEMPI_NP=2 MOEMPI_CONFIG=input/demo.toml MOEMPI_OVERWRITE=1 jobs/moempi-local.sh
#
# Outputs are named moempi-local.h5 ("{job}" is "local" outside Slurm) and an existing one is
# never replaced unless MOEMPI_OVERWRITE=1. On a machine with fewer cores than ranks set
# MOEMPI_OVERSUBSCRIBE=1 (MPICH: yield instead of busy-polling).
# Knobs (environment; see jobs/common.sh for the rest):
#   MOEMPI_NP             ranks (default 4)
#   MOEMPI_MPIEXEC        the launcher (default: the venv's mpiexec, else mpiexec on PATH)
#   MOEMPI_MPIEXEC_ARGS   more launcher arguments
#   MOEMPI_OVERSUBSCRIBE  1: MPICH settings for more ranks than cores (default 0)
#   MOEMPI_TIMEOUT        seconds before mpiexec ends a hung job (MPIEXEC_TIMEOUT; default none)
set -euo pipefail

MOEMPI_JOBS_DIR=${MOEMPI_JOBS_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
# shellcheck source=jobs/common.sh
source "$MOEMPI_JOBS_DIR/common.sh"

if [[ -z ${MOEMPI_MPIEXEC:-} && -x ${MOEMPI_VENV:-/nonexistent}/bin/mpiexec ]]; then
    MOEMPI_MPIEXEC=$MOEMPI_VENV/bin/mpiexec
fi
MOEMPI_MPIEXEC=${MOEMPI_MPIEXEC:-mpiexec}
MOEMPI_MPIEXEC_ARGS=${MOEMPI_MPIEXEC_ARGS:-}
MOEMPI_NP=${MOEMPI_NP:-4}
MOEMPI_OVERSUBSCRIBE=${MOEMPI_OVERSUBSCRIBE:-0}
MOEMPI_TIMEOUT=${MOEMPI_TIMEOUT:-}

[[ $MOEMPI_NP =~ ^[1-9][0-9]*$ ]] || moempi_die "MOEMPI_NP must be a positive integer, not '$MOEMPI_NP'"
if [[ $MOEMPI_OVERSUBSCRIBE == 1 ]]; then
    export MPIR_CVAR_CH4_PROGRESS_THROTTLE=${MPIR_CVAR_CH4_PROGRESS_THROTTLE:-true}
    export MPIR_CVAR_CH4_PROGRESS_THROTTLE_NO_PROGRESS_COUNT=${MPIR_CVAR_CH4_PROGRESS_THROTTLE_NO_PROGRESS_COUNT:-1}
    export MPIR_CVAR_POLLS_BEFORE_YIELD=${MPIR_CVAR_POLLS_BEFORE_YIELD:-1}
fi
[[ -n $MOEMPI_TIMEOUT ]] && export MPIEXEC_TIMEOUT=$MOEMPI_TIMEOUT
# a workstation has no allocation: keep Hydra from looking for one
[[ -z ${SLURM_JOB_ID:-} ]] && export HYDRA_LAUNCHER=${HYDRA_LAUNCHER:-fork}
moempi_threads
moempi_banner

# shellcheck disable=SC2206  # MOEMPI_MPIEXEC(_ARGS) are lists of words
launch=($MOEMPI_MPIEXEC -n "$MOEMPI_NP" $MOEMPI_MPIEXEC_ARGS)
moempi_check_world "$MOEMPI_NP" "${launch[@]}"
moempi_run_args
"${launch[@]}" "$MOEMPI_BIN" "${MOEMPI_RUN[@]}"
echo "moempi job ${MOEMPI_JOB}: done at $(date -Is)"
