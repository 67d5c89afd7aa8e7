# Source this file (bash) to use the local SLURM cluster started by slurm/start.sh:
#   source slurm/env.sh
# It exports SLURM_CONF, which sbatch passes on to jobs, and puts slurm/bin first on PATH for
# the sacct stand-in, because the local cluster has no accounting storage.
# Set DCP_SLURM_STATE_DIR first when start.sh ran with it.

_dcp_slurm_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
export SLURM_CONF="${DCP_SLURM_STATE_DIR:-$_dcp_slurm_dir/state}/slurm.conf"

# Drop an earlier copy of slurm/bin from PATH, then prepend it.
_dcp_path=":$PATH:"
_dcp_path=${_dcp_path//":$_dcp_slurm_dir/bin:"/:}
_dcp_path=${_dcp_path#:}
_dcp_path=${_dcp_path%:}
export PATH="$_dcp_slurm_dir/bin${_dcp_path:+:$_dcp_path}"
unset _dcp_slurm_dir _dcp_path
