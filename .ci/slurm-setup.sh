#!/usr/bin/env bash
# Install a single-node Slurm (Debian's slurm-wlm 22.05) and munge for tests/test_slurm.py.
#
#   .ci/slurm-setup.sh            # as root (or with sudo available); idempotent
#
# Quick when everything is already there: it only checks for the binaries. Installs nothing
# else and starts no daemon (tests/slurm/cluster.sh brings the daemons up and down).
# Knobs:
#   SLURM_PACKAGES  packages to install (default: slurm-wlm munge)
#   APT_GET         apt-get command (default: apt-get, with sudo when not root)
set -euo pipefail

SLURM_PACKAGES=${SLURM_PACKAGES:-"slurm-wlm munge"}

have_all() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null \
        && command -v mungekey >/dev/null
}

if have_all; then
    echo "slurm-setup: slurm and munge already installed ($(slurmctld -V))"
    exit 0
fi

if [[ $(id -u) -eq 0 ]]; then
    APT_GET=${APT_GET:-apt-get}
elif command -v sudo >/dev/null; then
    APT_GET=${APT_GET:-"sudo apt-get"}
else
    echo "slurm-setup: need root (or sudo) to install $SLURM_PACKAGES" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null; then
    echo "slurm-setup: no apt-get here; install $SLURM_PACKAGES with your package manager" >&2
    exit 1
fi

echo "slurm-setup: installing $SLURM_PACKAGES"
$APT_GET update -qq
# shellcheck disable=SC2086  # the package list is meant to split
DEBIAN_FRONTEND=noninteractive $APT_GET install -y -qq --no-install-recommends $SLURM_PACKAGES
have_all || { echo "slurm-setup: install finished but slurmctld/slurmd/sbatch/munged missing" >&2; exit 1; }
echo "slurm-setup: installed $(slurmctld -V)"
