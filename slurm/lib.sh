# Shell functions shared by slurm/start.sh and slurm/stop.sh (sourced, not run).

# Print the seconds since $1 (a ${EPOCHREALTIME/./} value in microseconds) with two decimals.
elapsed_since() {
  local now_us=${EPOCHREALTIME/./}
  local delta_us=$((now_us - $1))
  printf '%d.%02d' $((delta_us / 1000000)) $((delta_us % 1000000 / 10000))
}

# Print the PID in PID_FILE when that process is alive and named NAME. A zombie (state Z) counts
# as stopped, because PID 1 in some containers never reaps exited daemons.
live_pid() {
  local pid_file=$1 name=$2 pid
  # A stopping daemon removes its pid file and its /proc entry at any moment, so every read may fail.
  pid=$(cat "$pid_file" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  [[ $(cat /proc/"$pid"/comm 2>/dev/null) == "$name" ]] || return 1
  local stat
  stat=$(cat /proc/"$pid"/stat 2>/dev/null) || return 1
  stat=${stat##*) }
  [[ ${stat%% *} != Z ]] || return 1
  echo "$pid"
}
